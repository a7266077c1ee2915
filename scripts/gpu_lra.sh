#!/usr/bin/env bash
# Issue 16: Long Range Arena ListOps, Image and Pathfinder x softmax, linear, bn, sh, bn_sh on one
# GPU, at the published PyTorch LRA budgets (configs/lra/*.yaml: 5,000 / 35,000 / 62,400 steps)
# scaled by a fraction (BUDGET; per task if asked), inside TIME_LIMIT seconds. Clean protocol, bf16
# autocast.
#
#   1. Pathfinder images are generated on the CPU in the background from the start (the generator
#      is one process, ~12.5 ms per image; LRA's 200k would take ~40 min): PF_TRAIN training
#      images (default: what PF_GEN_SECONDS of generation makes) and PF_EVAL validation and test
#      images. Longer budgets repeat the training images in laps (max_train_samples).
#   2. Timing probe (scripts/probe_lra.py --device cuda): ListOps and Image, every variant alone on
#      the GPU, a few steps, no accuracy. Pathfinder's model has Image's shape (length 1024,
#      batch 256, vocabulary 257), so it takes Image's step times.
#   3. BUDGET=auto: the largest fraction (at most 1) for which every run, timed as if the runs went
#      one after the other (conservative: concurrent runs overlap their CPU work), fits into the
#      time left, and the Pathfinder runs fit between the end of the generation and the limit.
#      CONCURRENCY_GAIN=2 assumes concurrent runs go twice as fast as one after the other.
#      BUDGET=0.05 fixes it; LISTOPS_BUDGET / IMAGE_BUDGET / PATHFINDER_BUDGET fix one task's
#      (auto then shares the rest of the time among the others). The budgets are the same for
#      every variant and seed of a task and fixed before any accuracy is seen.
#   4. The runs, each its own `pda sweep --workers 1` process: ListOps and Image at once, Pathfinder
#      as soon as its data is ready; at most MAX_PARALLEL at a time (default: as many as the
#      probe's peak memory lets the GPU hold). A run still going at TIME_LIMIT is stopped (its
#      last.pt stays) and left out of the tables.
#   5. Tables: `pda sweep --report-only` (README.md) and a summary with the probe's cost per task
#      (seconds per 1,000 steps alone on the GPU, peak memory); printed at the end.
#
# Data: ListOps and Pathfinder are generated here. Image needs the CIFAR-10 JPEG zip: CIFAR_ZIP, or
# $PDA_CIFAR_ZIP, or shared/data/cifar10/CIFAR-10-images/CIFAR-10-images.zip inside the checkout,
# or ../shared/data/... beside it (the default of `pda`); without it Image is skipped. Nothing is
# downloaded.
#
# Expected on one H100 (an estimate; no GPU was used to write this): eager bf16 steps of these
# small models are launch-bound, ~8-16 ms per step and variant (the H200 CIFAR rows of
# results/cifar10/cost.csv scaled to 2 layers), so the full budgets summed over the five variants
# one after the other are ~1.6 h of GPU time (ListOps ~5 min, Image ~33 min, Pathfinder ~60 min):
# they do not fit 10 minutes. With TIME_LIMIT=540 the auto budget comes out near 0.03-0.06
# (ListOps ~150-300 steps, Image ~1,000-2,000, Pathfinder ~2,000-3,700); the probe decides.
# To bring back: $OUT gets README.md, runs.csv, summary.md, probe.md, log.txt and
# lra_gpu_results.tar.gz (logs, configs, plots). Carry the CIFAR-10 zip in the checkout, e.g.
# shared/data/cifar10/CIFAR-10-images/CIFAR-10-images.zip (50 MB; the tree must stay < 64 MiB).
#
# Usage: [BUDGET=auto|fraction] [LISTOPS_BUDGET=f] [IMAGE_BUDGET=f] [PATHFINDER_BUDGET=f]
#        [TIME_LIMIT=540] [TASKS="listops image pathfinder"]
#        [VARIANTS=softmax,linear,bn,sh,bn_sh] [SEEDS=0] [DEVICE=cuda] [PRECISION=bf16]
#        [COMPILE=off|auto|on] [EVAL_SAMPLES=2000] [PF_EVAL=1000] [PF_TRAIN=n | PF_GEN_SECONDS=180]
#        [MAX_PARALLEL=n] [CIFAR_ZIP=path] [RESULTS=runs/lra_gpu/results-<UTC time>] [RUNS=runs/lra_gpu]
#        [PYTHON=python3] [OUT=folder for the files to bring back] [EXTRA="--set k=v ..."]
#        [PROBE_STEPS=8] [PROBE_WARMUP=3] [RESERVE=90] scripts/gpu_lra.sh
# CPU smoke test (minutes): DEVICE=cpu BUDGET=0.0005 VARIANTS=softmax,bn_sh EVAL_SAMPLES=64
#   PF_EVAL=64 PF_TRAIN=200 PROBE_STEPS=1 PROBE_WARMUP=0 EXTRA="--set epochs=2 --set batch_size=8"
#   RESULTS=/tmp/lra_gpu_test RUNS=/tmp/lra_gpu_test_runs scripts/gpu_lra.sh
set -uo pipefail
start=$(date +%s)
BUDGET=${BUDGET:-auto}
TIME_LIMIT=${TIME_LIMIT:-540}
TASKS=${TASKS:-listops image pathfinder}
VARIANTS=${VARIANTS:-softmax,linear,bn,sh,bn_sh}
SEEDS=${SEEDS:-0}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
COMPILE=${COMPILE:-off}
EVAL_SAMPLES=${EVAL_SAMPLES:-2000}
PF_EVAL=${PF_EVAL:-1000}
PF_GEN_SECONDS=${PF_GEN_SECONDS:-180}
RESERVE=${RESERVE:-90}   # seconds kept for process start, data loading, evaluation and the report
RESULTS=${RESULTS:-runs/lra_gpu/results-$(date -u +%Y%m%dT%H%M%S)}  # each call its own: one budget per folder
RUNS=${RUNS:-runs/lra_gpu}
PYTHON=${PYTHON:-python3}
DEST=${OUT:-$RESULTS}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[[ "$RUNS" == /* ]] && cache="$RUNS/cache" || cache="$PWD/$RUNS/cache"
export PDA_CACHE_DIR=${PDA_CACHE_DIR:-$cache}  # generated ListOps and Pathfinder data
PDA=("$PYTHON" -m primal_dual_attention.cli)
mkdir -p "$RESULTS" "$RUNS" "$DEST"
LOG="$DEST/log.txt"
exec > >(tee -a "$LOG") 2>&1
elapsed() { echo $(( $(date +%s) - start )); }
say() { echo "[gpu_lra $(elapsed)s] $*"; }

say "machine: $(nproc) cores; $("$PYTHON" -c 'import torch; print("torch", torch.__version__,
    torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' 2>&1)"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

# ---------------------------------------------------------------------------------- data
has() { [[ " $TASKS " == *" $1 "* ]]; }
if has image; then
    for zip in "${CIFAR_ZIP:-}" "${PDA_CIFAR_ZIP:-}" shared/data/cifar10/CIFAR-10-images/CIFAR-10-images.zip \
               ../shared/data/cifar10/CIFAR-10-images/CIFAR-10-images.zip; do
        if [[ -n "$zip" && -f "$zip" ]]; then export PDA_CIFAR_ZIP=$(realpath "$zip"); break; fi
    done
    if [[ -z "${PDA_CIFAR_ZIP:-}" || ! -f "$PDA_CIFAR_ZIP" ]]; then
        say "no CIFAR-10 zip found (CIFAR_ZIP=...): Image is skipped"
        TASKS=${TASKS//image/}
    else
        say "CIFAR-10 zip: $PDA_CIFAR_ZIP"
    fi
fi

pf_pid=
pf_ready=0
if has pathfinder; then
    per_image=$("$PYTHON" scripts/lra_gpu_helpers.py pf-rate) || { say "Pathfinder generator failed"; per_image=1; }
    if [[ -z "${PF_TRAIN:-}" ]]; then  # what PF_GEN_SECONDS of generation makes on this CPU
        PF_TRAIN=$("$PYTHON" -c "print(max(1000, int($PF_GEN_SECONDS / $per_image) - 2 * $PF_EVAL))")
    fi
    pf_ready=$("$PYTHON" -c "print(int($(elapsed) + 1.15 * ($PF_TRAIN + 2 * $PF_EVAL) * $per_image))")
    say "Pathfinder: $per_image s per image; generating $PF_TRAIN training and $PF_EVAL + $PF_EVAL" \
        "evaluation images in the background (ready at about ${pf_ready}s)"
    "$PYTHON" scripts/lra_gpu_helpers.py pf-generate "$PF_TRAIN" "$PF_EVAL" > "$RUNS/pathfinder_data.log" 2>&1 &
    pf_pid=$!
fi

# ---------------------------------------------------------------------------------- probe
probe_json="$RUNS/probe.jsonl"
rm -f "$probe_json"
probe_tasks=()
has listops && probe_tasks+=(listops)
if has image; then probe_tasks+=(image); elif has pathfinder; then probe_tasks+=(pathfinder); fi
for task in "${probe_tasks[@]}"; do  # one after the other: each variant alone on the GPU
    "$PYTHON" scripts/probe_lra.py --task "$task" --variants "$VARIANTS" --precisions "$PRECISION" \
        --device "$DEVICE" --threads 1 --warmup "${PROBE_WARMUP:-3}" --steps "${PROBE_STEPS:-8}" \
        --eval-batches 2 --json "$probe_json" $([[ "$COMPILE" != off ]] && echo --compile) > "$RUNS/probe_$task.md" 2> "$RUNS/probe_$task.err" \
        || say "the $task probe failed: $(tail -3 "$RUNS/probe_$task.err")"
done
{ echo "# Timing probe (scripts/probe_lra.py: each variant alone, a few steps, no accuracy)"; echo
  for task in "${probe_tasks[@]}"; do grep -v '^$' "$RUNS/probe_$task.md"; echo; done; } > "$RESULTS/probe.md"
cat "$RESULTS/probe.md"

# ---------------------------------------------------------------------------------- budget
IFS=, read -ra seed_list <<< "$SEEDS"
fixed=
for task in $TASKS; do  # LISTOPS_BUDGET, IMAGE_BUDGET, PATHFINDER_BUDGET: a fraction for one task
    value_name="${task^^}_BUDGET"
    [[ -n "${!value_name:-}" ]] && fixed+="$task=${!value_name},"
done
plan=$("$PYTHON" scripts/lra_gpu_helpers.py plan "$probe_json" --budget "$BUDGET" --limit "$TIME_LIMIT" \
       --now "$(elapsed)" --reserve "$RESERVE" --tasks "$TASKS" --variants "$VARIANTS" --fixed "$fixed" \
       --gain "${CONCURRENCY_GAIN:-1}" \
       --seeds "${#seed_list[@]}" --pf-ready "$pf_ready" ${MAX_PARALLEL:+--max-parallel "$MAX_PARALLEL"} \
       --device "$DEVICE") || { say "budget planning failed"; exit 1; }
read -r fractions parallel works <<< "$plan"
declare -A fraction
for pair in ${fractions//,/ }; do fraction[${pair%%=*}]=${pair#*=}; done
say "fraction of the published steps: $fractions (asked: BUDGET=$BUDGET${fixed:+, fixed ${fixed%,}});" \
    "runs at once: $parallel; GPU seconds of each task's runs at budget 1 (probe step times, summed): $works"
if has pathfinder && [[ "${fraction[pathfinder]}" != "0" ]]; then
    "$PYTHON" -c "import sys; sys.exit(round(62400 * ${fraction[pathfinder]}) * 256 < $PF_TRAIN)" \
        || say "warning: Pathfinder's budget uses fewer than PF_TRAIN=$PF_TRAIN images: its runs generate their own"
fi

# ---------------------------------------------------------------------------------- runs
deadline=$(( start + TIME_LIMIT - 25 ))
common=(--task lra --workers 1 --threads 1 --out "$RESULTS" --seeds "$SEEDS"
        --set precision="$PRECISION" --set device="$DEVICE" --set compile="$COMPILE" ${EXTRA:-})  # EXTRA: more sweep options, e.g. for a CPU smoke test
run_pids=()
alive_runs() { local n=0 pid; for pid in "${run_pids[@]}"; do kill -0 "$pid" 2> /dev/null && n=$((n + 1)); done; echo $n; }
launch() {  # task variant extra-options...: one sweep process, once fewer than $parallel run
    local task=$1 variant=$2; shift 2
    [[ "${fraction[$task]}" == "0" ]] && { say "$task: no time left, not run"; return; }
    while (( $(alive_runs) >= parallel && $(date +%s) < deadline )); do sleep 1; done
    (( $(date +%s) < deadline )) || { say "deadline: $task $variant not started"; return; }
    "${PDA[@]}" sweep "${common[@]}" --datasets "$task" --variants "$variant" --set budget="${fraction[$task]}" "$@" \
        > "$RUNS/sweep_${task}_${variant}.log" 2>&1 &
    run_pids+=($!)
}
if true; then
    IFS=, read -ra variant_list <<< "$VARIANTS"
    for task in listops image; do
        has "$task" || continue
        for variant in "${variant_list[@]}"; do launch "$task" "$variant" --set max_eval_samples="$EVAL_SAMPLES"; done
    done
    if has pathfinder; then
        while kill -0 "$pf_pid" 2> /dev/null && (( $(date +%s) < deadline )); do sleep 1; done
        if grep -q "^Pathfinder" "$RUNS/pathfinder_data.log"; then
            say "Pathfinder data: $(tail -1 "$RUNS/pathfinder_data.log")"
            for variant in "${variant_list[@]}"; do
                launch pathfinder "$variant" --set max_eval_samples="$PF_EVAL" --set max_train_samples="$PF_TRAIN"
            done
        else
            say "Pathfinder data not ready or failed: $(tail -3 "$RUNS/pathfinder_data.log"); Pathfinder skipped"
        fi
    fi
    # watchdog: stop what still runs at the deadline (last.pt stays; unfinished runs are not in the tables)
    while (( $(alive_runs) > 0 && $(date +%s) < deadline )); do sleep 2; done
    for pid in "${run_pids[@]}"; do
        if kill -0 "$pid" 2> /dev/null; then say "deadline: stopping run process $pid"; kill "$pid"; fi
    done
    for pid in "${run_pids[@]}"; do
        wait "$pid" 2> /dev/null || say "run process $pid stopped or failed (exit $?): see $RUNS/sweep_*.log"
    done
fi
[[ -n "$pf_pid" ]] && kill "$pf_pid" 2> /dev/null

# ---------------------------------------------------------------------------------- tables
"${PDA[@]}" sweep --task lra --report-only --results "$RESULTS" > /dev/null || say "report failed"
"$PYTHON" scripts/lra_gpu_helpers.py summary "$RESULTS" "$probe_json" "$fractions" > "$RESULTS/summary.md"
cp "$RESULTS/probe.md" "$RESULTS/summary.md" "$DEST/" 2> /dev/null
if [[ "$DEST" != "$RESULTS" ]]; then
    cp "$RESULTS/README.md" "$RESULTS/runs.csv" "$DEST/" 2> /dev/null
    tar -czf "$DEST/lra_gpu_results.tar.gz" --exclude="*.pt" "$RESULTS" "$RUNS"/*.log "$RUNS"/*.md "$RUNS"/*.jsonl 2> /dev/null
fi
echo
cat "$RESULTS/summary.md"
say "done"
