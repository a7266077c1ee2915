#!/usr/bin/env bash
# Long Range Arena on the 2-core CPU machine (issue 8): ListOps, Text, Image and Pathfinder x
# softmax, linear, bn, sh, bn_sh, seed 0, with step budgets scaled (--set budget=...) so one run
# takes a few minutes on one thread; then each variant's cost at the task's full length.
# Resumable: finished runs are skipped, an interrupted run continues from its last.pt.
set -euo pipefail
PDA=${PDA:-pda}
V=softmax,linear,bn,sh,bn_sh
common=(--task lra --variants "$V" --seeds 0 --workers 2 --threads 1 --out runs/lra --merge-into results/lra/history_issue8)
$PDA sweep "${common[@]}" --datasets listops --set budget=0.02 --set epochs=4 --set max_eval_samples=256
$PDA sweep "${common[@]}" --datasets text --set budget=0.001 --set epochs=4 --set max_eval_samples=128
$PDA sweep "${common[@]}" --datasets image --set budget=0.00034 --set epochs=4 --set max_eval_samples=256
$PDA sweep "${common[@]}" --datasets pathfinder --set budget=0.0002 --set epochs=4 --set max_eval_samples=256
for dataset in listops text image pathfinder; do
    $PDA bench model --task lra --dataset "$dataset" --variants "$V" --batch 8 --repeats 3 \
        --device cpu --out results/lra/history_issue8
done
$PDA sweep --task lra --report-only --results results/lra/history_issue8
