#!/usr/bin/env bash
# DINOv2 pretraining under plain sbatch (no submitit): srun starts ONE task per node, and torchrun on each node
# spawns one process per GPU; the nodes meet through a c10d rendezvous on the first node of the allocation.
#
#   sbatch launch/sbatch_torchrun.sh --config configs/train/vitb14_8gpu.yaml data.path=/datasets/brain_mri
#   sbatch --nodes=8 --partition=gpu --account=proj --time=48:00:00 \
#       launch/sbatch_torchrun.sh --config configs/train/vitl14_64gpu.yaml data.path=/datasets/imagenet
#
# sbatch options on the command line override the #SBATCH defaults below (keep --ntasks-per-node=1).
# Arguments after the script name go to `python -m dinov2_repro.train`; `--resume` is added, so a requeued
# job continues from <output_dir>/checkpoints/latest with the same schedule and data order.
#
# Preemption / time limit: SLURM sends USR2 to this batch shell 120 s before the end (--signal=B:USR2@120);
# the trap requeues the job (same job id), and the requeued job resumes from the last periodic checkpoint
# (checkpoint.period_iterations), so at most one checkpoint period of work is lost.
#
# Environment: GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE, else 8), MASTER_PORT (default: derived from the
# job id), TORCHRUN (default: torchrun, else "python -m torch.distributed.run"), PYTHON (default python3).
#
#SBATCH --job-name=dinov2-torchrun
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "launch/sbatch_torchrun.sh: submit me with sbatch (SLURM_JOB_ID is not set);" \
       "on a machine without SLURM use launch/torchrun.sh" >&2
  exit 2
fi
if [ $# -eq 0 ]; then
  echo "launch/sbatch_torchrun.sh: no training arguments; usage:" \
       "sbatch launch/sbatch_torchrun.sh --config FILE [key=value ...]" >&2
  exit 2
fi

nnodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
gpus_per_node="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
# read the whole host list (with `| head -n 1`, pipefail would turn scontrol's SIGPIPE into a failure)
mapfile -t hosts < <(scontrol show hostnames "${SLURM_JOB_NODELIST}")
[ ${#hosts[@]} -ge 1 ] || { echo "launch/sbatch_torchrun.sh: no host in SLURM_JOB_NODELIST" >&2; exit 2; }
head_node="${hosts[0]}"
port="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"

if [ -n "${TORCHRUN:-}" ]; then
  read -r -a launcher <<<"$TORCHRUN"
elif command -v torchrun >/dev/null 2>&1; then
  launcher=(torchrun)
else
  launcher=("${PYTHON:-python3}" -m torch.distributed.run)
fi
train_args=("$@")
has_resume=0
for a in "${train_args[@]}"; do [ "$a" = "--resume" ] && has_resume=1; done
[ "$has_resume" -eq 1 ] || train_args+=(--resume)

# A plain checkout works too (no `pip install -e .`): the job runs in the submission directory.
export PYTHONPATH="${SLURM_SUBMIT_DIR:-$PWD}${PYTHONPATH:+:${PYTHONPATH}}"

echo "[sbatch_torchrun] job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): ${nnodes} node(s) x" \
     "${gpus_per_node} GPU(s) = world size $((nnodes * gpus_per_node)); rendezvous ${head_node}:${port}"

signalled=0
requeue() {
  signalled=1
  echo "[sbatch_torchrun] caught USR2 (preemption or time limit): requeueing job ${SLURM_JOB_ID};" \
       "it resumes from the last checkpoint"
  scontrol requeue "${SLURM_JOB_ID}" || echo "[sbatch_torchrun] scontrol requeue failed: resubmit this script" \
       "with the same arguments; it resumes from the last checkpoint" >&2
}
trap requeue USR2

srun_args=(--ntasks-per-node=1 --kill-on-bad-exit=1)
# SLURM 22.05-23.02 srun does not inherit --cpus-per-task: without it torchrun and the data loaders get 1 CPU.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  srun_args+=(--cpus-per-task="${SLURM_CPUS_PER_TASK}")
fi

# --rdzv-id = job id: a requeued job (same id) forms a fresh rendezvous on the new allocation.
srun "${srun_args[@]}" \
  "${launcher[@]}" \
  --nnodes="${nnodes}" --nproc-per-node="${gpus_per_node}" \
  --rdzv-backend=c10d --rdzv-endpoint="${head_node}:${port}" --rdzv-id="${SLURM_JOB_ID}" \
  -m dinov2_repro.train "${train_args[@]}" &
srun_pid=$!

# bash runs a trap only between commands: srun runs in the background so that USR2 is handled at once. A
# trapped signal makes `wait` return early (status > 128); wait again for srun's own exit status (bash keeps
# it even when srun ended meanwhile).
while true; do
  signalled=0
  wait "${srun_pid}" && status=0 || status=$?
  if [ "${status}" -gt 128 ] && [ "${signalled}" -eq 1 ]; then
    continue
  fi
  break
done
exit "${status}"
