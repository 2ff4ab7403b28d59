#!/usr/bin/env bash
# Launch DINOv2 pretraining with torchrun: one node with several GPUs, or several nodes (c10d rendezvous).
# Run `launch/torchrun.sh --help` for the usage.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/torchrun.sh [options] -- --config FILE [--output-dir DIR] [key=value ...]

One node, all its GPUs (torchrun --standalone):
  launch/torchrun.sh --gpus 8 -- --config configs/train/vitb14_8gpu.yaml data.path=/datasets/brain_mri

Several nodes: run the SAME command on every node; the rendezvous host is any one of them (usually the first):
  launch/torchrun.sh --nnodes 4 --gpus 8 --rdzv-endpoint node001:29400 --rdzv-id vitl-run1 \
      -- --config configs/train/vitl14_64gpu.yaml data.path=/datasets/imagenet

options:
  -g, --gpus N             processes (GPUs) per node (default: GPUs visible to nvidia-smi, else 1)
  -n, --nnodes N           number of nodes (default 1); N > 1 needs --rdzv-endpoint
  -e, --rdzv-endpoint H:P  c10d rendezvous host:port, reachable from every node
  -i, --rdzv-id ID         rendezvous id, the same on every node of one run (default: dinov2-repro)
  -r, --max-restarts N     torchrun restarts the workers up to N times after a failure; they resume from the
                           last checkpoint (default 0)
      --dry-run            print the torchrun command and exit
  -h, --help               this text

Everything after `--` goes to `python -m dinov2_repro.train` (the `dinov2-repro train` arguments); `--resume` is
added so that a restarted launch continues from <output_dir>/checkpoints/latest.
Environment: TORCHRUN (default: torchrun, else "python -m torch.distributed.run"), PYTHON (default python3).
EOF
}

die() { echo "launch/torchrun.sh: error: $*" >&2; echo "(see launch/torchrun.sh --help)" >&2; exit 2; }

is_int() { [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ]; }

gpus=""
nnodes=1
rdzv_endpoint=""
rdzv_id="dinov2-repro"
max_restarts=0
dry_run=0
train_args=()

while [ $# -gt 0 ]; do
  case "$1" in
    -g|--gpus) [ $# -ge 2 ] || die "$1 needs a value"; gpus="$2"; shift 2 ;;
    -n|--nnodes) [ $# -ge 2 ] || die "$1 needs a value"; nnodes="$2"; shift 2 ;;
    -e|--rdzv-endpoint) [ $# -ge 2 ] || die "$1 needs a value"; rdzv_endpoint="$2"; shift 2 ;;
    -i|--rdzv-id) [ $# -ge 2 ] || die "$1 needs a value"; rdzv_id="$2"; shift 2 ;;
    -r|--max-restarts) [ $# -ge 2 ] || die "$1 needs a value"; max_restarts="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; train_args=("$@"); break ;;
    *) die "unknown option '$1' (training arguments go after '--')" ;;
  esac
done

if [ -z "$gpus" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') && [ "$n" -ge 1 ]; then
    gpus="$n"
  else
    gpus=1
  fi
fi
is_int "$gpus" || die "--gpus '$gpus' must be a positive integer"
is_int "$nnodes" || die "--nnodes '$nnodes' must be a positive integer"
[[ "$max_restarts" =~ ^[0-9]+$ ]] || die "--max-restarts '$max_restarts' must be an integer >= 0"
[ ${#train_args[@]} -gt 0 ] || die "no training arguments: add '-- --config FILE [key=value ...]'"

if [ -n "${TORCHRUN:-}" ]; then
  read -r -a launcher <<<"$TORCHRUN"
elif command -v torchrun >/dev/null 2>&1; then
  launcher=(torchrun)
else
  launcher=("${PYTHON:-python3}" -m torch.distributed.run)
fi

cmd=("${launcher[@]}")
if [ "$nnodes" -eq 1 ]; then
  [ -z "$rdzv_endpoint" ] || die "--rdzv-endpoint is only for several nodes (--nnodes > 1)"
  cmd+=(--standalone --nnodes=1)
else
  [ -n "$rdzv_endpoint" ] || die "--nnodes $nnodes needs --rdzv-endpoint HOST:PORT (a host every node can reach)"
  [[ "$rdzv_endpoint" =~ ^[^:]+:[0-9]+$ ]] || die "--rdzv-endpoint '$rdzv_endpoint' must look like HOST:PORT"
  cmd+=(--nnodes="$nnodes" --rdzv-backend=c10d --rdzv-endpoint="$rdzv_endpoint" --rdzv-id="$rdzv_id")
fi
cmd+=(--nproc-per-node="$gpus" --max-restarts="$max_restarts" -m dinov2_repro.train "${train_args[@]}")
has_resume=0
for a in "${train_args[@]}"; do [ "$a" = "--resume" ] && has_resume=1; done
[ "$has_resume" -eq 1 ] || cmd+=(--resume)

echo "launch/torchrun.sh: ${nnodes} node(s) x ${gpus} process(es) = world size $((nnodes * gpus))" >&2
if [ "$dry_run" -eq 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
printf '%q ' "${cmd[@]}" >&2; echo >&2
# A plain checkout works too (no `pip install -e .`): put the repository on the workers' import path.
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${cmd[@]}"
