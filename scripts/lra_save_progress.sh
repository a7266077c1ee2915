#!/usr/bin/env bash
# Keep the LRA runs that have not finished across sessions: a session's background processes and
# its ignored run folders end with it, so the resume state of every unfinished run (last.pt,
# best.pt, log.csv, config.yaml; about 2 MB per checkpoint) is committed under
# checkpoints/lra_in_progress/. To resume in a new session, put it back where the runner looks
# and start the runner (finished runs are skipped, unfinished ones continue from last.pt):
#   mkdir -p runs/lra_learn && cp -r checkpoints/lra_in_progress/lra runs/lra_learn/
#   cp -r results/lra/runs.csv results/lra/logs runs/lra_learn/  # the finished runs: skipped
#   for last in runs/lra_learn/lra/*/*/*/*/last.pt; do [ -f "${last%last.pt}best.pt" ] || cp "$last" "${last%last.pt}best.pt"; done
#   nohup setsid scripts/lra_cpu_learn.sh >> runs/lra_learn/runner.log 2>&1 < /dev/null &
# Usage: [RUNS=runs/lra_learn] scripts/lra_save_progress.sh
set -euo pipefail
RUNS=${RUNS:-runs/lra_learn}
DEST=checkpoints/lra_in_progress
rm -rf "$DEST/lra"
find "$RUNS/lra" -name last.pt | while read -r last; do
  run=$(dirname "$last")
  [[ -f "$run/summary.json" ]] && continue  # finished: its row is in runs.csv
  target="$DEST/${run#"$RUNS"/}"
  mkdir -p "$target"
  cp "$run"/last.pt "$run"/log.csv "$run"/config.yaml "$target"/ 2> /dev/null || true
  # best.pt is kept only when it is not last.pt again (the restore step copies it back)
  cmp -s "$run/best.pt" "$run/last.pt" || cp "$run/best.pt" "$target"/ 2> /dev/null || true
  echo "saved $target ($(tail -n 1 "$run/log.csv" | cut -d, -f1) rounds)"
done
