#!/usr/bin/env bash
# Issue 13 on this CPU: the model-level training-step table, eager and compiled (fp32). Each
# model's variants are timed in one process, round-robin (pda bench model --modes), so the
# ratios to softmax compare like with like; run it on a quiet machine (nothing else busy).
# Usage: [DATA=.bench_data] [RESULTS=results/speed/cpu] [MODES=eager,compile] [REPEATS=30]
#        scripts/cpu_speed.sh [model ...]   (models: vit_cifar_b2 vit_cifar_b64 deit_tiny_b16
#        uea_jv_b16 uea_uwave_b16 listops_b8; default all)
set -uo pipefail
DATA=${DATA:-.bench_data}
RESULTS=${RESULTS:-results/speed/cpu}
MODES=${MODES:-eager,compile}
REPEATS=${REPEATS:-30}
PDA=${PDA:-pda}
declare -A MODELS=(
  [vit_cifar_b2]="--task image --dataset CIFAR10 --batch 2 --set data_dir=$DATA/cifar10/CIFAR-10-images.zip"
  [vit_cifar_b64]="--task image --dataset CIFAR10 --batch 64 --set data_dir=$DATA/cifar10/CIFAR-10-images.zip"
  [deit_tiny_b16]="--task imagenet --dataset imagenet --batch 16 --set data_dir=$DATA/imagefolder --set num_workers=0"
  [uea_jv_b16]="--task uea --dataset JapaneseVowels --batch 16 --set data_dir=$DATA/uea"
  [uea_uwave_b16]="--task uea --dataset UWaveGestureLibrary --batch 16 --set data_dir=$DATA/uea"
  [listops_b8]="--task lra-listops --dataset listops --batch 8 --set steps=10 --set epochs=1 --set max_eval_samples=64"
)
names=("$@")
[[ ${#names[@]} -eq 0 ]] && names=(vit_cifar_b2 vit_cifar_b64 deit_tiny_b16 uea_jv_b16 uea_uwave_b16 listops_b8)
for name in "${names[@]}"; do
  echo "== $name"
  # shellcheck disable=SC2086
  $PDA bench model --device cpu --modes "$MODES" --repeats "$REPEATS" ${MODELS[$name]} --out "$RESULTS"
done
