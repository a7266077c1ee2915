#!/usr/bin/env bash
# The LRA report of issue 16: copy what the background runs (scripts/lra_cpu_learn.sh) have finished
# into results/lra, then write NOTES.md (scripts/lra_report.py: notes_prose.md + cost per task +
# the issue-8 history) and README.md (`pda sweep --report-only`: the tables, NOTES.md below them).
# Only finished runs (rows of runs.csv) appear; run it again as more finish.
# Usage: [RUN_RESULTS=/work/lra-run/results/lra] [PDA=pda] [PYTHON=python3] scripts/lra_report.sh
set -euo pipefail
RUN_RESULTS=${RUN_RESULTS:-results/lra}
PDA=${PDA:-pda}
PYTHON=${PYTHON:-python3}
RESULTS=results/lra
if [[ "$(realpath "$RUN_RESULTS")" != "$(realpath "$RESULTS")" ]]; then
    for item in runs.csv logs cost.csv cost_commands.txt sweep_commands.txt machines.txt; do
        [[ -e "$RUN_RESULTS/$item" ]] && cp -r "$RUN_RESULTS/$item" "$RESULTS/"
    done
fi
"$PYTHON" scripts/lra_report.py "$RESULTS" > "$RESULTS/NOTES.md.tmp"  # a failure keeps the old notes
mv "$RESULTS/NOTES.md.tmp" "$RESULTS/NOTES.md"
if [[ -f "$RESULTS/runs.csv" ]]; then
    $PDA sweep --task lra --report-only --results "$RESULTS"
else  # nothing finished yet: the notes alone
    { echo "# Long Range Arena (LRA)"; echo
      echo "No run of the issue-16 budgets has finished yet; the runs are in progress."; echo
      echo "## Notes"; echo; cat "$RESULTS/NOTES.md"; } > "$RESULTS/README.md"
    echo "wrote $RESULTS/README.md (no finished runs yet)"
fi
