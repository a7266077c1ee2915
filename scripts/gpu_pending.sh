#!/usr/bin/env bash
# The GPU checks still pending (issues 13 and 16), in one call of at most 9.5 minutes on one GPU
# (the device runs a command for at most 10):
#   0. the FlexAttention tests with gradients (tests/test_flex.py; they are skipped on the CPU);
#   1. length buckets: the ListOps timing probe with trimmed batches (--length-buckets 0) and
#      with the engine's CUDA default (8 per octave), each variant alone, bf16 eager;
#   2. the image models on this code (SH pooled by avg_pool2d, BN's fewer kernels):
#      scripts/gpu_speed.sh, eager and compiled, for vit_cifar and DeiT-tiny, grouped SH (the
#      default) and then with every SH call in one FlexAttention call (pack_heads="flex"; the
#      matrix-packed path, pack_heads=true, is measured the same way with that EXTRA);
#   3. the LRA runs (scripts/gpu_lra.sh, ListOps and Image) in the time left, if any.
# Everything is written under WORK (runs/gpu_pending) and packed at the end into
# OUT/gpu_pending.tar.gz, beside copies of test_flex.txt, probe_buckets.md, speed_grouped.md,
# speed_flex.md and lra_summary.md (the device tool brings back at most 8 files).
# Data: DATA as for gpu_speed.sh (scripts/make_bench_data.py) and the CIFAR-10 zip for Image
# (CIFAR_ZIP or shared/data/... in the checkout, see gpu_lra.sh; without it Image is skipped).
# The device takes only the checkout (64 MiB in all), so copy the zip into the ignored .bench_data
# first, `mkdir -p .bench_data/cifar10_full && cp ../shared/data/cifar10/CIFAR-10-images/CIFAR-10-images.zip
# .bench_data/cifar10_full/` (50 MiB; with the tracked tree and the two bench folders ~62 MiB:
# carry nothing more), then
#   run(command="OUT=$OUT CIFAR_ZIP=.bench_data/cifar10_full/CIFAR-10-images.zip scripts/gpu_pending.sh",
#       carry=[".bench_data/cifar10", ".bench_data/imagefolder", ".bench_data/cifar10_full"], timeout_s=600)
# OUT must be the device's $OUT (the default stays on the device). The fixed steps take ~570 s of
# the 15 device minutes: plan on one try (ONLY=vit_cifar_b256 or fewer PROBE_VARIANTS for less).
# Usage: [OUT=folder] [DATA=.bench_data] [TOTAL=570] [PYTHON=python3] scripts/gpu_pending.sh
# CPU smoke test (no timing meaning): DEVICE=cpu PRECISION=fp32 ONLY=vit_cifar_b8 MODES=eager
#   REPEATS=1 PROBE_STEPS=1 PROBE_WARMUP=0 PROBE_VARIANTS=linear TOTAL=100 OUT=/tmp/gp WORK=/tmp/gp_work
#   scripts/gpu_pending.sh
set -uo pipefail
start=$(date +%s)
OUT=${OUT:-results/gpu_pending}
WORK=${WORK:-runs/gpu_pending}
DATA=${DATA:-.bench_data}
TOTAL=${TOTAL:-570}
PYTHON=${PYTHON:-python3}
export DEVICE=${DEVICE:-cuda} PRECISION=${PRECISION:-bf16}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
left() { echo $(( TOTAL - ($(date +%s) - start) )); }

timeout 100 "$PYTHON" -m pytest -o addopts="" -q -rs -p no:cacheprovider tests/test_flex.py > "$OUT/test_flex.txt" 2>&1
echo "flex tests done at $(( $(date +%s) - start )) s: $(tail -n 1 "$OUT/test_flex.txt")"

{ for buckets in 0 8; do
    timeout 70 "$PYTHON" scripts/probe_lra.py --task listops --variants "${PROBE_VARIANTS:-softmax,linear,bn,sh,bn_sh}" \
        --precisions "$PRECISION" --device "$DEVICE" --threads 1 --warmup "${PROBE_WARMUP:-3}" --steps "${PROBE_STEPS:-8}" \
        --eval-batches 1 \
        --length-buckets "$buckets" | grep -v '^$'
    echo
  done; } > "$WORK/probe_buckets.md" 2> "$WORK/probe_buckets.err"
cp "$WORK/probe_buckets.md" "$OUT/" 2> /dev/null  # each table is in OUT as soon as it exists
echo "probes done at $(( $(date +%s) - start )) s"

models="${ONLY:-vit_cifar_b256 deit_tiny_b64}"  # batch 256 is dispatch-bound on an H200 too
DATA="$DATA" RESULTS="$WORK/speed_grouped" REPEATS="${REPEATS:-10}" ONLY="$models" EXTRA= PYTHON="$PYTHON" \
    timeout 165 scripts/gpu_speed.sh > "$WORK/gpu_speed_grouped_log.txt" 2>&1
cp "$WORK/speed_grouped/speed.md" "$OUT/speed_grouped.md" 2> /dev/null
echo "grouped speed table done at $(( $(date +%s) - start )) s"
DATA="$DATA" RESULTS="$WORK/speed_flex" REPEATS="${REPEATS:-10}" ONLY="$models" \
    EXTRA='--set attention_options={"pack_heads":"flex"}' PYTHON="$PYTHON" \
    timeout 165 scripts/gpu_speed.sh > "$WORK/gpu_speed_flex_log.txt" 2>&1
cp "$WORK/speed_flex/speed.md" "$OUT/speed_flex.md" 2> /dev/null
echo "flex speed table done at $(( $(date +%s) - start )) s"

limit=$(( $(left) - 30 ))  # time to pack the files
if (( limit > 150 )); then
    OUT="$WORK/lra" TASKS="listops image" TIME_LIMIT="$limit" PYTHON="$PYTHON" \
        timeout $(( limit + 20 )) scripts/gpu_lra.sh > "$WORK/gpu_lra_log.txt" 2>&1
fi
cp "$WORK/lra/summary.md" "$OUT/lra_summary.md" 2> /dev/null
tar -czf "$OUT/gpu_pending.tar.gz" --exclude="*.pt" -C "$WORK" . 2> /dev/null
echo "done in $(( $(date +%s) - start )) s"
