#!/usr/bin/env bash
# Put the committed resume state of the unfinished LRA runs (scripts/lra_save_progress.sh) back
# where scripts/lra_cpu_learn.sh looks, with the finished runs' rows so that they are skipped.
# Then start the runner:
#   nohup setsid scripts/lra_cpu_learn.sh >> runs/lra_learn/runner.log 2>&1 < /dev/null &
# A run folder that already holds a run's state (e.g. the same session continues) is not
# overwritten. The folder names are those scripts/lra_cpu_learn.sh uses by default.
# Usage: scripts/lra_restore_progress.sh
set -euo pipefail
SAVED=checkpoints/lra_in_progress
declare -A RESULTS_OF=([lra_learn]=results/lra [lra_listops_5000_steps]=results/lra/listops_5000_steps
                       [lra_listops_5000_steps_lr5e-4]=results/lra/listops_5000_steps_lr5e-4)
for name in "${!RESULTS_OF[@]}"; do
  runs=runs/$name results=${RESULTS_OF[$name]}
  mkdir -p "$runs"
  for item in runs.csv logs; do  # the finished runs: skipped, not redone. The saved sweep folder's
    # own copy first: it also holds runs that finished before their sweep merged them
    for from in "$SAVED/$name" "$results"; do
      [[ -e "$from/$item" && ! -e "$runs/$item" ]] && cp -r "$from/$item" "$runs/"
    done
  done
  [[ -d "$SAVED/$name/lra" ]] || { echo "nothing saved for $runs"; continue; }
  find "$SAVED/$name/lra" -name last.pt | while read -r saved; do
    run_dir=$(dirname "$saved") target=$runs/${run_dir#"$SAVED/$name/"}
    if [[ -f "$target/last.pt" ]]; then echo "kept $target (already there)"; continue; fi
    mkdir -p "$target" && cp "$run_dir"/* "$target"/
    [[ -f "$target/best.pt" ]] || cp "$target/last.pt" "$target/best.pt"  # stored only where it differs
    echo "restored $target ($(tail -n 1 "$target/log.csv" | cut -d, -f1) rounds)"
  done
done
