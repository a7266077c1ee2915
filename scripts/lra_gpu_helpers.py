"""The Python steps of `scripts/gpu_lra.sh` (issue 16), one subcommand each.

- `pf-rate`: seconds per generated Pathfinder image on this CPU (60 images).
- `pf-generate TRAIN EVAL`: build the Pathfinder task with `max_train_samples=TRAIN` and
  `max_eval_samples=EVAL` (the runs' own code path and sizes, so the runs read this cache).
- `plan PROBE.jsonl ...`: the budget fraction and how many runs go at once (see `plan`).
- `summary RESULTS PROBE.jsonl FRACTION`: the concise table printed at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

FULL_STEPS = {"listops": 5000, "image": 35000, "pathfinder": 62400}
ROUNDS = 10  # evaluation rounds of every configs/lra recipe (epochs)
VARIANT_ORDER = ("softmax", "linear", "bn", "sh", "bn_sh")


def pf_rate() -> float:
    from primal_dual_attention.data.lra import generate_pathfinder

    generate_pathfinder(4, 999)
    begin = time.perf_counter()
    generate_pathfinder(60, 998)
    return (time.perf_counter() - begin) / 60


def pf_generate(train: int, evaluation: int) -> str:
    from primal_dual_attention.training.config import TrainConfig, bundled_config
    from primal_dual_attention.training.tasks import build_task

    begin = time.perf_counter()
    cfg = bundled_config("lra", "pathfinder", TrainConfig(task="lra", dataset="pathfinder"))
    cfg = replace(cfg, max_train_samples=train, max_eval_samples=evaluation).validate()
    task = build_task(cfg)
    return f"{task.description} in {time.perf_counter() - begin:.0f} s"


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _round_down(value: float, digits: int = 3) -> float:
    if value <= 0:
        return 0.0
    scale = 10 ** (math.floor(math.log10(value)) - digits + 1)
    return math.floor(value / scale) * scale


def plan(probe: str, budget: str, limit: float, now: float, reserve: float, tasks: list[str],
         variants: list[str], seeds: int, pf_ready: float, max_parallel: int | None,
         device: str, fixed: dict[str, float] | None = None, gain: float = 1.0
         ) -> tuple[dict[str, float], int, dict[str, float]]:
    """Budget fraction per task, runs at once, and each task's GPU seconds at budget 1.

    Step times come from the probe (each variant alone); Pathfinder takes Image's (same model
    shape) when Image was probed. Tasks in ``fixed`` get their given fraction. ``budget`` is a
    fraction for the other tasks, or ``auto``: the largest common fraction (<= 1, 3 significant
    digits, rounded down) with 85 % margin such that (a) all runs, summed as if they ran one after
    the other, fit into ``limit - now - reserve`` and (b) the Pathfinder runs, summed, fit between
    ``pf_ready`` (when their images are ready) and ``limit - reserve``. ``gain`` > 1 assumes that
    concurrent runs finish that many times faster than one after the other.
    """
    fixed = dict(fixed or {})
    rows = _jsonl(Path(probe))
    step = {(r["task"], r["variant"]): r["s_per_step"] for r in rows}
    probed = {task for task, _ in step}

    def shape(task: str) -> str:
        return task if task in probed else "image" if "image" in probed else "pathfinder"

    unprobed = {t: [v for v in variants if (shape(t), v) not in step] for t in tasks}
    for task in (t for t in tasks if unprobed[t]):  # a failed probe costs that task, not the window
        print(f"warning: the probe has no step time of {task} for {unprobed[task]}: {task} is not run",
              file=sys.stderr)
    tasks = [t for t in tasks if not unprobed[t]]
    work = {t: seeds * sum(FULL_STEPS[t] * step[(shape(t), v)] for v in variants) / gain for t in tasks}
    free = [t for t in tasks if t not in fixed]
    if budget == "auto" and free:
        spent = sum(fixed[t] * work[t] for t in tasks if t in fixed)
        common = 0.85 * (limit - now - reserve - spent) / sum(work[t] for t in free)
        if "pathfinder" in free:
            common = min(common, 0.85 * (limit - reserve - max(pf_ready, now)) / work["pathfinder"])
        common = _round_down(min(1.0, common))
    else:
        common = float(budget) if budget != "auto" else 0.0
    # a run takes at least one step per evaluation round (the recipes' 10; pda refuses fewer);
    # 0 stays 0: no time left for that task, not run
    fractions = {t: fixed.get(t, common) for t in tasks}
    fractions = {t: f and max(f, ROUNDS / FULL_STEPS[t]) for t, f in fractions.items()}
    fractions |= {t: 0.0 for t in unprobed if unprobed[t]}  # 0: not run
    needed, left = sum(fractions[t] * work[t] for t in tasks), limit - now - reserve
    if needed > left:  # fixed budgets are not shrunk: say so before anything runs
        print(f"warning: these budgets need about {needed:.0f} s of GPU time (probe step times, gain "
              f"{gain:g}) and {left:.0f} s are left: runs still going at the limit are stopped and left "
              "out of the tables", file=sys.stderr)
    if max_parallel:
        parallel = max_parallel
    elif device.startswith("cuda"):
        import torch

        total = torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**20
        peak = max(r["peak_mib"] for r in rows)
        parallel = max(1, int(0.85 * total / (peak + 1024)))  # + CUDA context and allocator slack
    else:
        parallel = 2
    return fractions, parallel, work


def summary(results: Path, probe: str, fractions: dict[str, float]) -> str:
    step = {(r["task"], r["variant"]): r for r in _jsonl(Path(probe))}
    runs = []
    if (results / "runs.csv").is_file():
        with open(results / "runs.csv", newline="") as handle:
            runs = list(csv.DictReader(handle))
    budgets = ", ".join(f"{t} {f:g}" for t, f in fractions.items())
    lines = [f"LRA, fraction of the published steps: {budgets}; clean protocol "
             "(test accuracy of the epoch chosen on validation)",
             "| task | variant | runs | test acc (%) | steps | s / 1k steps (probe, alone) | "
             "peak MiB (probe) | wall s per run |",
             "|---|---|---|---|---|---|---|---|"]
    for task in (t for t in FULL_STEPS if t in fractions):  # the tasks this call ran
        for variant in VARIANT_ORDER:
            rows = [r for r in runs if r["dataset"] == task and r["variant"] == variant
                    and r["budget"] == f"{fractions[task]:g}"]  # this call's budget only
            probe_row = step.get((task, variant))
            if probe_row is None and task == "pathfinder":  # same model shape as Image
                probe_row = step.get(("image", variant))
            if not rows and probe_row is None:
                continue
            acc = [100 * float(r["test_acc"]) for r in rows]
            mean = f"{sum(acc) / len(acc):.2f}" if acc else "not finished"
            epochs = max((int(r["epochs"]) for r in rows), default=ROUNDS)
            steps = max(epochs, round(FULL_STEPS[task] * fractions.get(task, 0.0)))
            cost = (f"{1000 * probe_row['s_per_step']:.1f} | {probe_row['peak_mib']:.0f}"
                    if probe_row else "– | –")
            wall = ", ".join(f"{float(r['wall_seconds']):.0f}" for r in rows) or "–"
            lines.append(f"| {task} | {variant} | {len(rows)} | {mean} | {steps} | {cost} | {wall} |")
    return "\n".join(lines)


def _pairs(text: str) -> dict[str, float]:
    return {k: float(v) for k, v in (item.split("=") for item in text.split(",") if item)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("pf-rate")
    gen = sub.add_parser("pf-generate")
    gen.add_argument("train", type=int)
    gen.add_argument("evaluation", type=int)
    p = sub.add_parser("plan")
    p.add_argument("probe")
    p.add_argument("--budget", default="auto")
    p.add_argument("--limit", type=float, required=True)
    p.add_argument("--now", type=float, required=True)
    p.add_argument("--reserve", type=float, default=90)
    p.add_argument("--tasks", required=True, help="space separated")
    p.add_argument("--variants", required=True, help="comma separated")
    p.add_argument("--seeds", type=int, default=1, help="how many seeds")
    p.add_argument("--pf-ready", type=float, default=0.0, help="seconds after the start")
    p.add_argument("--max-parallel", type=int, default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--fixed", default="", help="task=fraction,... for tasks with a given budget")
    p.add_argument("--gain", type=float, default=1.0, help="assumed speed-up of concurrent runs")
    s = sub.add_parser("summary")
    s.add_argument("results", type=Path)
    s.add_argument("probe")
    s.add_argument("fractions", help="task=fraction,...")
    args = parser.parse_args()
    if args.command == "pf-rate":
        print(f"{pf_rate():.5f}")
    elif args.command == "pf-generate":
        print(pf_generate(args.train, args.evaluation))
    elif args.command == "plan":
        fractions, parallel, work = plan(args.probe, args.budget, args.limit, args.now, args.reserve,
                                         args.tasks.split(), args.variants.split(","), args.seeds,
                                         args.pf_ready, args.max_parallel, args.device,
                                         _pairs(args.fixed), args.gain)
        print(",".join(f"{t}={f:.6g}" for t, f in fractions.items()), parallel,
              ",".join(f"{t}={w:.0f}" for t, w in work.items()))
    else:
        print(summary(args.results, args.probe, _pairs(args.fractions)))


if __name__ == "__main__":
    main()
