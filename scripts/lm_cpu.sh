#!/usr/bin/env bash
# The byte-level IMDb LM table of issue 14 on one CPU thread: softmax, bn, sh, bn_sh, linear,
# linear_bn x seeds 0 1 2, equal parameters and steps (configs/lm/imdb.yaml, whose `steps` the
# timing probe results/lm/probe.md chose before any training), clean protocol.
# Resumable: a run with lm_eval.json, or whose result is committed under results/lm/runs (a later
# session), is done and skipped; an interrupted one continues from its last.pt (--resume). Each
# finished run is copied under results/lm and the report rewritten.
# The five fast variants run first (every seed), then causal linear BN, whose O(N^2 D) elementwise
# work makes a step several times slower (probe.md gives both durations).
# Usage: [PY=.venv/bin/python] [OUT=runs/lm] [VARIANTS="..."] [SLOW="linear_bn" or ""] [SEEDS="0 1 2"]
#        scripts/lm_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/lm}
RESULTS=${RESULTS:-results/lm}
VARIANTS=${VARIANTS-"softmax bn sh bn_sh linear"}  # VARIANTS="" runs only SLOW
SLOW=${SLOW-"linear_bn"}  # SLOW="" skips it
SEEDS=${SEEDS:-"0 1 2"}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$RESULTS"
# commands.txt: the commands of one run, then every invocation (lanes on disjoint VARIANTS may run
# at once, e.g. VARIANTS="sh bn_sh" SLOW="" and VARIANTS="softmax bn linear" SLOW="")
commands="$RESULTS/commands.txt"
if [[ ! -s $commands ]]; then
    printf '%s\n' "# per run (variant V, seed S):" \
        "$PY -m primal_dual_attention.cli train --task lm --dataset imdb --variant V --seed S --out-dir $OUT --threads 1 --resume --no-progress" \
        "$PY -m primal_dual_attention.analysis.lm_report evaluate $OUT/lm/imdb/clean/V/seedS --threads 1" \
        "$PY -m primal_dual_attention.analysis.lm_report report --runs $OUT --out $RESULTS" \
        "# invocations:" > "$commands"
fi
invocation="VARIANTS=\"$VARIANTS\" SLOW=\"$SLOW\" SEEDS=\"$SEEDS\" scripts/lm_cpu.sh"
grep -qxF -- "$invocation" "$commands" || echo "$invocation" >> "$commands"
for pass in "$VARIANTS" "$SLOW"; do
    for seed in $SEEDS; do
    for variant in $pass; do
        run="$OUT/lm/imdb/clean/$variant/seed$seed"
        [[ -f "$run/lm_eval.json" || -f "$RESULTS/runs/$variant/seed$seed.json" ]] && continue  # done here or committed
        echo "$(date '+%F %T') $variant seed $seed"
        "$PY" -m primal_dual_attention.cli train --task lm --dataset imdb --variant "$variant" --seed "$seed" \
            --out-dir "$OUT" --threads 1 --resume --no-progress
        "$PY" -m primal_dual_attention.analysis.lm_report evaluate "$run" --threads 1
        "$PY" -m primal_dual_attention.analysis.lm_report report --runs "$OUT" --out "$RESULTS"
    done
    done
done
