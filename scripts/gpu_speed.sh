#!/usr/bin/env bash
# Issue 13 on one GPU: the model-level training-step table, eager and compiled, bf16.
# Every model's variants are timed in one process, round-robin (pda bench model --modes), so the
# ratios to softmax compare like with like. Compilation is slow on its own, so a first phase
# compiles every model at once (one process each, 1 timed round) to fill the compile cache, and
# the timed phase, one model at a time, then reads its graphs from that cache.
# Data: DATA holds what scripts/make_bench_data.py writes (real CIFAR-10 and UEA files; the GPU
# machine has no ../shared/data); ListOps is generated. UEA needs aeon, which GPU images may
# lack: its rows are skipped there.
# Usage: [DATA=.bench_data] [RESULTS=results/speed/gpu] [DEVICE=cuda] [PRECISION=bf16]
#        [MODES=eager,compile] [REPEATS=20] scripts/gpu_speed.sh
set -uo pipefail
DATA=${DATA:-.bench_data}
RESULTS=${RESULTS:-results/speed/gpu}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
MODES=${MODES:-eager,compile}
REPEATS=${REPEATS:-20}
PDA=(python3 -m primal_dual_attention.cli bench model --device "$DEVICE" --modes "$MODES"
     --set precision="$PRECISION")
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
start=$(date +%s)
python3 -c "import aeon" 2>/dev/null && uea=1 || uea=0

# name | pda bench model arguments
MODELS=(
  "vit_cifar_b256|--task image --dataset CIFAR10 --batch 256 --set data_dir=$DATA/cifar10/CIFAR-10-images.zip"
  "vit_cifar_b8|--task image --dataset CIFAR10 --batch 8 --set data_dir=$DATA/cifar10/CIFAR-10-images.zip"
  "deit_tiny_b64|--task imagenet --dataset imagenet --batch 64 --set data_dir=$DATA/imagefolder --set num_workers=0"
  "listops_b32|--task lra-listops --dataset listops --batch 32 --set steps=10 --set epochs=1 --set max_eval_samples=64"
)
if [[ $uea == 1 ]]; then
  MODELS+=("uea_jv_b16|--task uea --dataset JapaneseVowels --batch 16 --set data_dir=$DATA/uea"
           "uea_uwave_b16|--task uea --dataset UWaveGestureLibrary --batch 16 --set data_dir=$DATA/uea")
fi

warm=$(mktemp -d)
for entry in "${MODELS[@]}"; do
  name=${entry%%|*}; args=${entry#*|}
  # shellcheck disable=SC2086
  "${PDA[@]}" $args --repeats 1 --out "$warm/$name" > "$warm/$name.log" 2>&1 &
done
wait
echo "compile cache filled in $(( $(date +%s) - start )) s"
for entry in "${MODELS[@]}"; do
  name=${entry%%|*}; args=${entry#*|}
  echo "== $name"
  # shellcheck disable=SC2086
  "${PDA[@]}" $args --repeats "$REPEATS" --out "$RESULTS" || { echo "$name failed:"; tail -5 "$warm/$name.log"; }
done
cat "$RESULTS/speed.md"
echo "done in $(( $(date +%s) - start )) s"
