#!/usr/bin/env bash
# The CIFAR-10 experiment of issue 6 on one GPU, sized to a time limit.
#   1. `pda bench model`: each variant's throughput, FLOPs and peak memory, alone on the GPU.
#   2. A probe: every run of the sweep trains 1 epoch, all in parallel, to measure the epoch time
#      under the same contention as the real sweep.
#   3. The sweep (softmax, bn, sh, bn_sh x seeds 0,1,2, clean protocol, all runs in parallel) with
#      the largest epoch budget that fits the time left. The budget is the same for every run and
#      is fixed before any accuracy is seen.
# Usage: [RESULTS=results/cifar10] [TIME_LIMIT=420] [DEVICE=cuda] [WORKERS=12] [EPOCHS=n: skip the
# probe] [PRECISIONS="bf16 fp32"] scripts/gpu_cifar.sh
set -uo pipefail
RESULTS=${RESULTS:-results/cifar10}
TIME_LIMIT=${TIME_LIMIT:-420}   # seconds for the whole script
MAX_EPOCHS=${MAX_EPOCHS:-60}
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-12}
PRECISION=${PRECISION:-bf16}
PDA=(python3 -m primal_dual_attention.cli)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # the device has the source tree, not the package
start=$(date +%s)
mkdir -p "$RESULTS"

for precision in ${PRECISIONS:-$PRECISION fp32}; do
    "${PDA[@]}" bench model --device "$DEVICE" --batch 256 --set precision="$precision" \
        --out "$RESULTS" || echo "bench failed"
done

if [[ -n "${EPOCHS:-}" ]]; then
    epochs=$EPOCHS
else
probe=$(mktemp -d)
"${PDA[@]}" sweep --task image --epochs 1 --set precision="$PRECISION" --set device="$DEVICE" \
    --workers "$WORKERS" --out "$probe"
epochs=$(python3 - "$probe/runs.csv" "$start" "$TIME_LIMIT" "$MAX_EPOCHS" <<'PY'
import csv, sys, time
rows = list(csv.DictReader(open(sys.argv[1])))
per_epoch = max(float(r["wall_seconds"]) for r in rows)  # slowest run, under full contention
left = float(sys.argv[3]) - (time.time() - float(sys.argv[2])) - 30  # process start + data decode
print(max(1, min(int(sys.argv[4]), int(0.85 * left / per_epoch))))
PY
)
echo "probe: $(cut -d, -f4,13 "$probe/runs.csv" | tr '\n' ' ') -> $epochs epochs per run"
fi
"${PDA[@]}" sweep --task image --epochs "$epochs" --set precision="$PRECISION" --set device="$DEVICE" \
    --workers "$WORKERS" --out "runs/sweep_gpu/epochs$epochs" --merge-into "$RESULTS"
echo "done in $(( $(date +%s) - start )) s"
