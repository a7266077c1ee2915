#!/usr/bin/env bash
# GPU check: every attention variant under fp32 / bf16 / fp16 (throughput and max deviation from
# fp32), eager and compiled, then one short bf16 training run per main variant. Run from the
# repository root on a machine with a CUDA device, after `make setup` (or any env with the package).
set -euo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # a device has the source tree, not the package
PDA=${PDA:-"python3 -m primal_dual_attention.cli"}
nvidia-smi --query-gpu=name,memory.total --format=csv
$PDA bench precision --device cuda --precisions fp32,bf16,fp16 --tokens 4096
$PDA bench precision --device cuda --precisions fp32,bf16 --tokens 4096 --compile
for variant in softmax bn sh bn_sh; do
  $PDA train --dataset JapaneseVowels --variant "$variant" --epochs 3 --precision bf16 \
    --device cuda --no-progress --out-dir runs/gpu_check
done
