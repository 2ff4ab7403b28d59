#!/usr/bin/env bash
# One prepared GPU session: the GPU-marked tests, then pretraining-step throughput, memory and MFU for
# ViT-S/B/L/14 (eager, per-block compile, activation checkpointing), the largest ViT-L/14 batch, the published
# DINOv2 step side by side, and the real loader feeding the step (CPU vs GPU augmentation), in that order of
# priority. Each section has its own time limit and is skipped when the budget cannot hold it, so a short lease
# still brings back what ran. Results: OUT/gpu_suite.md (tables), OUT/gpu_suite.json, OUT/results.tar.gz (every
# section's JSON and log), OUT/suite.log.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR [BUDGET_SECONDS]        # on a CUDA machine (default budget 480 s)
#   GPU_SUITE_DRY_RUN=1 bash benchmarks/gpu_suite.sh /tmp/gs 900  # CPU dry run: tiny sizes, same code paths
#
# GPU_SUITE_ONLY="name name ..." runs only those sections (a rerun of what failed or was skipped).
# DINOV2_SRC names a checkout of the published code (default .ref, holding dinov2/); nothing is downloaded.
set -u
OUT=${1:?usage: gpu_suite.sh OUT_DIR [BUDGET_SECONDS]}
BUDGET=${2:-480}
DINOV2_SRC=${DINOV2_SRC:-.ref}
DRY=${GPU_SUITE_DRY_RUN:-0}
WORK=$(mktemp -d /tmp/gpu_suite.XXXXXX)
START=$(date +%s)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/suite.log"; }

pack() { tar -czf "$OUT/results.tar.gz" -C "$WORK" . 2>/dev/null; }

# section NAME ESTIMATE_S LIMIT_S command... : run when ESTIMATE_S still fits the budget; output to WORK/NAME.log
section() {
    local name=$1 est=$2 limit=$3 used left rc t0
    shift 3
    if [[ -n ${GPU_SUITE_ONLY:-} && " $GPU_SUITE_ONLY " != *" $name "* ]]; then return; fi
    used=$(( $(date +%s) - START )); left=$(( BUDGET - used ))
    if (( est > left )); then
        log "SKIP $name (about ${est}s needed, ${left}s of the budget left)"
        printf '%s\tskipped\t0\n' "$name" >>"$WORK/sections.tsv"
        return
    fi
    (( limit > left + 30 )) && limit=$(( left + 30 ))
    log "RUN  $name (limit ${limit}s): $*"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    tail -n 4 "$WORK/$name.log" | sed 's/^/      /' | tee -a "$OUT/suite.log"
    log "END  $name rc=$rc in $(( $(date +%s) - t0 ))s"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >>"$WORK/sections.tsv"
    pack
}

if [[ $DRY == 1 ]]; then  # CPU: tiny shapes, every path once
    DEV=(--device cpu --precision fp32 --n-prototypes 1024)
    STEP=(--iters 1 --warmup 1)
    S=2; B=2; L=1; ARCH_B=vit_small; ARCH_L=vit_small
    E2E=(--n-images 24 --image-size 128 --iters 2 --warmup 1)
    WORKERS=1; TESTS=(tests/test_perf_train_step.py -k "not gpu")
else
    DEV=(--device cuda --precision bf16)
    STEP=(--iters 8 --warmup 2)
    S=128; B=64; L=32; ARCH_B=vit_base; ARCH_L=vit_large
    E2E=(--n-images 1024 --image-size 384 --iters 12 --warmup 3)
    WORKERS=16; TESTS=(-m gpu tests/test_backbone.py tests/test_gpu_precision.py tests/test_meta_arch.py
                       tests/test_perf_batched_augment.py tests/test_perf_train_step.py)
fi
J=$WORK

log "suite start: budget ${BUDGET}s, dry run ${DRY}, published code at ${DINOV2_SRC}"
section env 15 60 bash -c "nvidia-smi || true; df -h /dev/shm; nproc; $PY -c 'import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())'; $PY -c 'import xformers, xformers.ops; print(\"xformers\", xformers.__version__)' 2>&1 | tail -1"
section gpu_tests 70 180 $PY -m pytest -q -p no:cacheprovider "${TESTS[@]}"

# ours, eager, the three sizes (the reference points for everything below)
section step_s_eager 30 120 $PY benchmarks/train_step.py --arch vit_small --batch-size $S "${DEV[@]}" "${STEP[@]}" --profile-top 12 --json-out $J/step_s_eager.json
section step_b_eager 30 120 $PY benchmarks/train_step.py --arch $ARCH_B --batch-size $B "${DEV[@]}" "${STEP[@]}" --json-out $J/step_b_eager.json
section step_l_eager 35 120 $PY benchmarks/train_step.py --arch $ARCH_L --batch-size $L "${DEV[@]}" "${STEP[@]}" --profile-top 12 --json-out $J/step_l_eager.json
# the published step at the same batches
section pub_s 30 120 $PY benchmarks/published_step.py --dinov2-src "$DINOV2_SRC" --arch vit_small --batch-size $S "${DEV[@]}" "${STEP[@]}" --json-out $J/pub_s.json
section pub_b 30 120 $PY benchmarks/published_step.py --dinov2-src "$DINOV2_SRC" --arch $ARCH_B --batch-size $B "${DEV[@]}" "${STEP[@]}" --json-out $J/pub_b.json
section pub_l 35 120 $PY benchmarks/published_step.py --dinov2-src "$DINOV2_SRC" --arch $ARCH_L --batch-size $L "${DEV[@]}" "${STEP[@]}" --json-out $J/pub_l.json
# when xFormers is there but the published step failed with it: their plain path, crop by crop
for size in s b l; do
    arch=vit_small; bs=$S
    [[ $size == b ]] && { arch=$ARCH_B; bs=$B; }
    [[ $size == l ]] && { arch=$ARCH_L; bs=$L; }
    [[ -f $J/pub_$size.json ]] || section pub_${size}_plain 35 120 $PY benchmarks/published_step.py --dinov2-src "$DINOV2_SRC" --arch $arch --batch-size $bs --attention plain "${DEV[@]}" "${STEP[@]}" --json-out $J/pub_$size.json
done
# the loader feeding the step: colour photos, CPU augmentation in 16 workers vs augmentation on the GPU
section e2e_s_cpu 50 120 $PY benchmarks/end_to_end.py --arch vit_small --batch-size $S "${DEV[@]}" --source photos --num-workers $WORKERS "${E2E[@]}" --json-out $J/e2e_s_cpu.json
section e2e_s_gpu 50 120 $PY benchmarks/end_to_end.py --arch vit_small --batch-size $S "${DEV[@]}" --source photos --num-workers $WORKERS --gpu-augment "${E2E[@]}" --json-out $J/e2e_s_gpu.json
# per-block compile (first iteration reported apart: it compiles)
section step_s_compile 70 150 $PY benchmarks/train_step.py --arch vit_small --batch-size $S --variant compile "${DEV[@]}" "${STEP[@]}" --json-out $J/step_s_compile.json
section step_l_compile 80 160 $PY benchmarks/train_step.py --arch $ARCH_L --batch-size $L --variant compile "${DEV[@]}" "${STEP[@]}" --json-out $J/step_l_compile.json
if [[ $DRY != 1 ]]; then
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True section step_l_maxbatch 70 130 $PY benchmarks/train_step.py --arch vit_large --batch-size 64 --find-max-batch "${DEV[@]}" --iters 3 --warmup 1 --flop-counter none --json-out $J/step_l_maxbatch.json
fi
section e2e_b_cpu 50 120 $PY benchmarks/end_to_end.py --arch $ARCH_B --batch-size $B "${DEV[@]}" --source photos --num-workers $WORKERS "${E2E[@]}" --json-out $J/e2e_b_cpu.json
section step_l_compile_ac 80 160 $PY benchmarks/train_step.py --arch $ARCH_L --batch-size $(( 2 * L )) --variant compile --activation-checkpointing "${DEV[@]}" "${STEP[@]}" --json-out $J/step_l_compile_ac.json
section step_b_compile 70 150 $PY benchmarks/train_step.py --arch $ARCH_B --batch-size $B --variant compile "${DEV[@]}" "${STEP[@]}" --json-out $J/step_b_compile.json
section step_s_xformers 30 100 $PY benchmarks/train_step.py --arch vit_small --batch-size $S --variant xformers "${DEV[@]}" "${STEP[@]}" --json-out $J/step_s_xformers.json

$PY benchmarks/gpu_summary.py "$WORK" --markdown "$OUT/gpu_suite.md" --json "$OUT/gpu_suite.json" 2>&1 | tee -a "$OUT/suite.log"
pack
log "suite end"
