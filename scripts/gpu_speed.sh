#!/usr/bin/env bash
# Issue 13 on one GPU: the model-level training-step table, eager and compiled, bf16.
# Every model's variants are timed in one process, round-robin (pda bench model --modes), so the
# ratios to softmax compare like with like. Compilation is slow on its own, so a first phase
# compiles every model x variant at once (one process each, 1 timed round) to fill the compile
# cache; in the second phase one process per model starts at the same time, reads its graphs
# from that cache (tracing again, in parallel), and times its rounds while holding a lock
# (--timing-lock), so the GPU runs one model's timed rounds at a time.
# Data: DATA holds what scripts/make_bench_data.py writes (real CIFAR-10 and UEA files; the GPU
# machine has no ../shared/data); ListOps is generated. UEA needs aeon, which GPU images may
# lack: its rows are skipped there.
# Usage: [DATA=.bench_data] [RESULTS=results/speed/gpu] [DEVICE=cuda] [PRECISION=bf16]
#        [ONLY="vit_cifar_b8 ..."] [EXTRA="..."] [PYTHON=python3] [MODES=eager,compile] [REPEATS=20] [VARIANTS=softmax,bn,sh,bn_sh] scripts/gpu_speed.sh
set -uo pipefail
DATA=${DATA:-.bench_data}
RESULTS=${RESULTS:-results/speed/gpu}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
MODES=${MODES:-eager,compile}
REPEATS=${REPEATS:-20}
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # the package, uninstalled (no registry there)
# EXTRA: more `pda bench model` options for every model (split on spaces), e.g.
# EXTRA='--set attention_options={"pack_heads":true}'
read -r -a extra <<< "${EXTRA:-}"
PDA=("$PYTHON" -m primal_dual_attention.cli bench model --device "$DEVICE" --modes "$MODES"
     --set precision="$PRECISION" "${extra[@]}")
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
start=$(date +%s)
"$PYTHON" -c "import aeon" 2>/dev/null && uea=1 || uea=0

# name | pda bench model arguments
LISTOPS="listops_b32|--task lra-listops --dataset listops --batch 32 --set steps=10 --set epochs=1 --set max_eval_samples=64"
MODELS=(
  "vit_cifar_b256|--task image --dataset CIFAR10 --batch 256 --set data_dir=$DATA/cifar10/CIFAR-10-images.zip"
  "deit_tiny_b64|--task imagenet --dataset imagenet --batch 64 --set data_dir=$DATA/imagefolder --set num_workers=0"
  "vit_cifar_b8|--task image --dataset CIFAR10 --batch 8 --set data_dir=$DATA/cifar10/CIFAR-10-images.zip"
  "$LISTOPS"
)
if [[ $uea == 1 ]]; then
  MODELS+=("uea_jv_b16|--task uea --dataset JapaneseVowels --batch 16 --set data_dir=$DATA/uea"
           "uea_uwave_b16|--task uea --dataset UWaveGestureLibrary --batch 16 --set data_dir=$DATA/uea")
fi
if [[ -n "${ONLY:-}" ]]; then  # ONLY="vit_cifar_b8 ...": just these models
  kept=(); for entry in "${MODELS[@]}"; do [[ " $ONLY " == *" ${entry%%|*} "* ]] && kept+=("$entry"); done
  MODELS=("${kept[@]}")
fi

warm=$(mktemp -d)
# generate the ListOps sample once, before many processes would write its cache at the same time
if [[ " ${MODELS[*]} " == *"$LISTOPS"* ]]; then
  # shellcheck disable=SC2086
  "${PDA[@]}" ${LISTOPS#*|} --variants softmax --modes eager --repeats 1 --no-memory --out "$warm/data" \
    > "$warm/data.log" 2>&1 || tail -n 5 "$warm/data.log"
fi
IFS=, read -r -a variants <<< "${VARIANTS:-softmax,bn,sh,bn_sh}"
for entry in "${MODELS[@]}"; do
  name=${entry%%|*}; args=${entry#*|}
  for variant in "${variants[@]}"; do  # one compile per process, all at once
    # shellcheck disable=SC2086
    TORCHINDUCTOR_COMPILE_THREADS=2 OMP_NUM_THREADS=1 \
      "${PDA[@]}" $args --variants "$variant" --repeats 1 --no-memory --out "$warm/$name-$variant" \
      > "$warm/$name-$variant.log" 2>&1 &
  done
done
wait
echo "compile cache filled in $(( $(date +%s) - start )) s"
for entry in "${MODELS[@]}"; do
  name=${entry%%|*}; args=${entry#*|}
  # shellcheck disable=SC2086
  { "${PDA[@]}" $args --variants "${VARIANTS:-softmax,bn,sh,bn_sh}" --repeats "$REPEATS" --out "$RESULTS" \
      --timing-lock "$warm/gpu.lock" > "$warm/$name.log" 2>&1 \
    || { echo "$name failed:"; tail -n 5 "$warm/$name"*.log; }; } &
done
wait
for entry in "${MODELS[@]}"; do name=${entry%%|*}; echo "== $name"; grep "ms/step" "$warm/$name.log"; done
cat "$RESULTS/speed.md"
echo "done in $(( $(date +%s) - start )) s"
