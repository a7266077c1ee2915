#!/usr/bin/env bash
# Keep the LRA runs that have not finished across sessions: a session's background processes and
# its ignored run folders end with it, so the resume state of every unfinished run (last.pt,
# best.pt, log.csv, config.yaml; about 2 MB per checkpoint) of each run folder of
# scripts/lra_cpu_learn.sh is committed under checkpoints/lra_in_progress/<run folder>/, with the
# folder's own runs.csv and logs/ (finished runs not merged yet).
# scripts/lra_restore_progress.sh puts it back (finished runs are skipped, unfinished ones
# continue from last.pt when the runner starts again).
# Usage: [RUN_FOLDERS="runs/lra_learn runs/lra_listops_5000_steps ..."] scripts/lra_save_progress.sh
set -euo pipefail
RUN_FOLDERS=${RUN_FOLDERS:-runs/lra_learn runs/lra_listops_5000_steps runs/lra_listops_5000_steps_lr5e-4}
DEST=checkpoints/lra_in_progress
rm -rf "${DEST:?}/lra"  # the layout before run folders were named (2026-11-27, fifth session)
for runs in $RUN_FOLDERS; do
  [[ -d "$runs/lra" ]] || { echo "no runs in $runs: its saved state (if any) is kept"; continue; }
  rm -rf "${DEST:?}/$(basename "$runs")"  # replaced by the state of now, finished runs dropped
  # the sweep folder's own rows and logs: a run of a several-seed sweep that finished before the
  # others has its row only there (the sweep merges when all its runs are done); without them it
  # would be trained again
  mkdir -p "$DEST/$(basename "$runs")"
  for item in runs.csv logs; do
    [[ -e "$runs/$item" ]] && cp -r "$runs/$item" "$DEST/$(basename "$runs")/"
  done
  find "$runs/lra" -name last.pt | while read -r last; do
    run=$(dirname "$last")
    [[ -f "$run/summary.json" ]] && continue  # finished: its row is in runs.csv
    target="$DEST/$(basename "$runs")/${run#"$runs"/}"
    mkdir -p "$target"
    cp "$run"/last.pt "$run"/log.csv "$run"/config.yaml "$target"/ 2> /dev/null || true
    # best.pt is kept only when it is not last.pt again (the restore step copies it back)
    cmp -s "$run/best.pt" "$run/last.pt" || cp "$run/best.pt" "$target"/ 2> /dev/null || true
    echo "saved $target ($(tail -n 1 "$run/log.csv" | cut -d, -f1) rounds)"
  done
done
