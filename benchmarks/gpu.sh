#!/usr/bin/env bash
# The GPU checks in one call (the GPU issue): CUDA tests, then `moelab bench layer|train|generate --device
# cuda` with the issue's shapes, each step under its own time limit so one slow step cannot eat the rest.
# Usage (repository root, a CUDA machine with torch >= 2.8 and transformers installed):
#     bash benchmarks/gpu.sh [OUT_DIR]        # results: OUT_DIR/*.json and OUT_DIR/gpu.log
# SMALL=1 DEVICE=cpu bash benchmarks/gpu.sh /tmp/x   # a dry run of the script itself on a CPU, tiny shapes.
# Budget: about 8 minutes on one H200 (BUDGET=seconds to change); steps that would not fit are skipped.
set -u
OUT=${1:-${OUT:-benchmarks/gpu}}
mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-480}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$SECONDS
LOG="$OUT/gpu.log"
: >"$LOG"
step() {  # step NAME SECONDS CMD...: run CMD under a limit, if the budget still has that much
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET - (SECONDS - start)))
    if [ "$left" -lt 20 ]; then echo "SKIP $name (budget spent)" | tee -a "$LOG"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s, t=$((SECONDS - start))s)" | tee -a "$LOG"
    local t0=$SECONDS
    timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv 2>&1 || true
  $PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__,
"cuda", torch.cuda.is_available())'; } | tee -a "$LOG"

if [ "${SMALL:-0}" = 1 ]; then
    LAYER=(--tokens 256 --d-model 64 --shapes 8:2:64 16:4:32 --repeats 2 --warmup 1 --hf grouped_mm)
    TRAIN=(--config tiny --set model.n_layers=1 --set data.seq_len=32 --set train.batch_size=2 --steps 2 --warmup 1
           --repeats 1 --compare hf --dtypes bfloat16 --profile)
    GEN=(--configs configs/tiny.yaml --prompt-len 16 --new-tokens 4 --batch-sizes 1 2 --repeats 1 --compare hf
         --dtype bfloat16)
    TRAIN_COMPILE=(--config tiny --set model.n_layers=1 --set data.seq_len=32 --set train.batch_size=2 --steps 2
                   --warmup 1 --repeats 1 --dtypes bfloat16 --set train.compile=true)
    TESTS=()
else
    LAYER=(--preset h200 --warmup 3 --backends auto cpu_buckets)
    TRAIN=(--preset h200 --profile)  # --profile: kernels and device-busy time of one step per variant
    GEN=(--configs configs/large.yaml --batch-sizes 1 32 --compare hf --dtype bfloat16 --prompt-len 128
         --new-tokens 32 --repeats 2)
    TRAIN_COMPILE=(--config gpu-fine --dtypes bfloat16 --steps 6 --warmup 3 --repeats 1
                   --set train.compile=true)
    TESTS=(tests/kernels/test_kernels_cuda.py tests/test_cuda.py)
fi

# STEPS picks and orders the steps (default: these, most wanted first -- a short budget skips the tail;
# `generate` alone, `layer-profile`, `layer-align8` and `lora` run when named).
STEPS=${STEPS:-"tests generate-compiled layer train train-compile probe"}
for s in $STEPS; do
    case $s in
    tests) [ ${#TESTS[@]} -gt 0 ] && step cuda-tests 120 $PY -m pytest -m cuda -q -p no:cacheprovider "${TESTS[@]}" \
               --junitxml "$OUT/cuda-tests.xml" ;;
    layer) step bench-layer 100 $PY -m moelab bench layer --device "$DEVICE" "${LAYER[@]}" --json "$OUT/layer.json" ;;
    layer-profile) step bench-layer-profile 60 $PY -m moelab bench layer --device "$DEVICE" "${LAYER[@]}" --hf \
               --backends auto --repeats 3 --profile --json "$OUT/layer_profile.json" ;;
    layer-align8) MOELAB_GROUPED_MM_ALIGN=8 step bench-layer-align8 60 $PY -m moelab bench layer --device "$DEVICE" \
               "${LAYER[@]}" --hf --backends auto --repeats 5 --json "$OUT/layer_align8.json" ;;
    train) step bench-train 200 $PY -m moelab bench train --device "$DEVICE" "${TRAIN[@]}" --json "$OUT/train.json" ;;
    generate) step bench-generate 100 $PY -m moelab bench generate --device "$DEVICE" "${GEN[@]}" \
               --json "$OUT/generate.json" ;;
    # eager, compiled (CUDA graphs) and transformers side by side in one run
    generate-compiled) step bench-generate-compiled 180 $PY -m moelab bench generate --device "$DEVICE" "${GEN[@]}" \
               --compile --json "$OUT/generate_compiled.json" ;;
    train-compile) step bench-train-compile 130 $PY -m moelab bench train --device "$DEVICE" "${TRAIN_COMPILE[@]}" \
               --json "$OUT/train_compile.json" ;;
    probe) [ "$DEVICE" = cpu ] || step grouped-mm-probe 40 $PY benchmarks/grouped_mm_probe.py ;;
    lora) step lora-grouped-mm 60 $PY benchmarks/lora_grouped_mm.py --device "$DEVICE" --out "$OUT/lora_grouped_mm.json" ;;
    *) echo "unknown step $s" ;;
    esac
done
echo "total $((SECONDS - start))s" | tee -a "$LOG"
# The tables, last, where a caller reading only the end of the output sees them.
grep -E "^=== |passed|failed|error|^ +(dense|moelab|hf)|tok/s|MFU|x \(target|/ hf|skipped|Error|profiled step" "$LOG" \
    | tail -80
