"""``README.md`` of a CIFAR-10 or LRA sweep folder, built from its ``runs.csv``, logs and costs.

One table per dataset: a row per variant with the test accuracy (mean ± std over seeds, and
each seed), the epoch the validation split chose, and the model's cost from ``cost.csv``
(``pda bench model``). One plot per dataset of the test accuracy per epoch (mean over seeds,
band = min..max), which the clean protocol logs when ``track_test`` is on — for the curve only,
never to choose an epoch. Every number printed is computed from those files.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from primal_dual_attention.analysis.model_cost import SPARSE_FLOPS_NOTE
from primal_dual_attention.analysis.uea_report import (
    BASELINE,
    finished_span,
    machines,
    mean_std,
    read_runs,
    run_budget,
    write_uea_report,
)
from primal_dual_attention.attention import VARIANTS

TITLES = {"image": "CIFAR-10 with timm ViTs (`vit_cifar_*`)", "lra": "Long Range Arena (LRA)"}


def write_task_report(task: str, results_dir: str | Path) -> Path:
    """The UEA report for ``uea``, else the per-dataset report below."""
    if task == "uea":
        return write_uea_report(results_dir)
    return write_sweep_report(results_dir, TITLES.get(task.split("-")[0], task))


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _lines_of(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _curves(results_dir: Path, dataset: str, protocol: str, runs: list[dict]) -> list[list[dict]]:
    """The per-epoch logs of ``runs`` (rows of ``runs.csv``): a log without its row (a run cut
    between the two writes) is not drawn."""
    folder = results_dir / "logs" / dataset / protocol
    return [_read_csv(folder / r["variant"] / f"seed{r['seed']}.csv") for r in runs]


def _plot(results_dir: Path, dataset: str, variants: list[str], protocol: str,
          rows: list[dict]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = False
    for variant in variants:
        runs = sorted((r for r in rows if r["variant"] == variant), key=lambda r: int(r["seed"]))
        logs = [log for log in _curves(results_dir, dataset, protocol, runs)
                if log and log[0].get("test_acc")]
        if not logs:
            continue
        length = min(len(log) for log in logs)
        acc = 100 * np.array([[float(r["test_acc"]) for r in log[:length]] for log in logs])
        epochs = np.arange(1, length + 1)
        line, = ax.plot(epochs, acc.mean(0), label=f"{variant} (n={len(logs)})")
        ax.fill_between(epochs, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.2)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{dataset}: test accuracy per epoch (mean over seeds, band = min..max)")
    ax.grid(alpha=0.3)
    ax.legend()
    name = f"accuracy_{dataset}.png"
    fig.tight_layout()
    fig.savefig(results_dir / name, dpi=120)
    plt.close(fig)
    return name


def _configs(results_dir: Path, dataset: str, protocol: str) -> list[dict]:
    import yaml

    return [yaml.safe_load(p.read_text())
            for p in sorted((results_dir / "logs" / dataset / protocol).glob("*/seed*.yaml"))]


def _percent(value: float) -> str:
    """Two significant digits, whole numbers from 100 (``.2g`` writes 100 as ``1e+02``)."""
    return f"{value:.2g}" if value < 100 else f"{value:.0f}"


def _step_budget(cfg: dict) -> str:
    """One line on a step-budgeted run: steps run against the configured (published) steps."""
    run = max(cfg["epochs"], round(cfg["steps"] * cfg["budget"]))
    evaluation = (f"; validation and test on {cfg['max_eval_samples']} samples each (fixed seed)"
                  if cfg.get("max_eval_samples") else "")
    return (f"Budget: {run} steps of batch {cfg['batch_size']} = {cfg['budget']:g} of the configured "
            f"{cfg['steps']} steps ({_percent(100 * run / cfg['steps'])} %){evaluation}; sequence length "
            f"{cfg.get('max_len')}.")


def _cost_cells(costs: list[dict], dataset: str, variant: str) -> str:
    rows = [c for c in costs if c["dataset"] == dataset and c["variant"] == variant]
    if not rows:
        return " – | – | – | – |"
    several_modes = len({r.get("mode", "eager") for r in rows}) > 1  # then say which is which
    several_shapes = len({r.get("input_shape") for r in rows}) > 1

    def label(row: dict) -> str:
        return (_device_label(row) + (f", {row.get('mode', 'eager')}" if several_modes else "")
                + (f", input {row['input_shape']}" if several_shapes else ""))

    cells = []
    for key in ("train_samples_per_s", "infer_samples_per_s"):
        cells.append(", ".join(f"{float(r[key]):,.0f} ({label(r)})" for r in rows))
    peak = ", ".join(f"{float(r['peak_train_mb']):,.0f} ({label(r)})" for r in rows
                     if r["peak_train_mb"] not in ("", "None"))
    return f" {float(rows[0]['gflops_fwd_per_sample']):.3f} | {cells[0]} | {cells[1]} | {peak or '–'} |"


def _device_label(row: dict) -> str:
    return f"{row['device'].split(':')[0]} {row['precision']}, batch {row['batch']}"


def _dataset_section(results_dir: Path, dataset: str, rows: list[dict], costs: list[dict]) -> list[str]:
    """One table per protocol and budget: runs of other budgets (``--allow-mixed``) are never
    pooled as seeds of one run."""
    present = {r["variant"] for r in rows}
    variants = [v for v in VARIANTS if v in present]
    out = [f"## {dataset}", ""]
    for protocol in sorted({r["protocol"] for r in rows}):
        budgets = sorted({run_budget(r) for r in rows if r["protocol"] == protocol})
        saved = _configs(results_dir, dataset, protocol)  # read once per protocol
        for epochs, budget in budgets:
            subset = [r for r in rows if r["protocol"] == protocol and run_budget(r) == (epochs, budget)]
            configs = [c for c in saved if (str(c["epochs"]), f"{c.get('budget', 1):g}") == (epochs, budget)]
            out += [f"Protocol `{protocol}`, epochs (evaluation rounds) per run: {epochs}."]
            out += sorted({_step_budget(c) for c in configs if c.get("steps")})
            out += _accuracy_table(subset, variants, dataset, costs)
            if len(budgets) > 1:
                out += ["(No per-epoch curve: the logs of runs at several budgets share one folder.)", ""]
                continue
            plot = _plot(results_dir, dataset, variants, protocol, subset)
            if plot:
                out += [f"![test accuracy per epoch]({plot})", ""]
    return out


def _accuracy_table(rows: list[dict], variants: list[str], dataset: str, costs: list[dict]) -> list[str]:
    """The rows of one protocol and budget: a line per variant, then each variant against softmax
    paired by seed."""
    out = ["",
           "| variant | test acc (%) | per seed | chosen epoch | params | GFLOPs fwd/sample | "
           "train samples/s | inference samples/s | peak train MiB |",
           "|---|---|---|---|---|---|---|---|---|"]
    means = {}
    for variant in variants:
        runs = sorted((r for r in rows if r["variant"] == variant), key=lambda r: int(r["seed"]))
        if not runs:
            continue
        acc = np.array([100 * r["test_acc"] for r in runs])
        means[variant] = {int(r["seed"]): a for r, a in zip(runs, acc, strict=True)}
        seeds = ", ".join(f"{a:.2f}" for a in acc)
        chosen = ", ".join(r["best_epoch"] for r in runs)
        out.append(f"| {variant} | {mean_std(acc, 2)} (n={len(acc)}) | {seeds} | "
                   f"{chosen} | {int(runs[0]['params']):,} |" + _cost_cells(costs, dataset, variant))
    out.append("")
    if BASELINE in means:
        base = means[BASELINE]
        for variant, acc in means.items():
            if variant == BASELINE:
                continue
            seeds = sorted(set(acc) & set(base))  # paired by seed: same seed, same data order
            if not seeds:
                continue
            ours, theirs = np.array([acc[s] for s in seeds]), np.array([base[s] for s in seeds])
            both = "" if len(seeds) == len(acc) == len(base) else f" (the {len(seeds)} seeds both ran)"
            out.append(f"- `{variant}` − `softmax`: {ours.mean() - theirs.mean():+.2f} points{both}; "
                       f"higher on {int(np.sum(ours > theirs))} of {len(seeds)} seeds (same seed, same "
                       "data order).")
        out.append("")
    return out


def write_sweep_report(results_dir: str | Path, title: str) -> Path:
    results_dir = Path(results_dir)
    rows = read_runs(results_dir / "runs.csv")
    costs = _read_csv(results_dir / "cost.csv")
    lines = [
        f"# {title}",
        "",
        "Generated by `pda sweep --report-only` from `runs.csv` (one row per finished run; "
        "per-epoch logs under `logs/`) and `cost.csv` (`pda bench model`). Test accuracy in %, "
        "mean ± sample std over seeds. Protocol `clean` (SPEC §4): the epoch is chosen on a stratified "
        "held-out part of the training split; the test split only gives the reported number "
        "(and, for the curves, its accuracy per epoch, which takes no part in the choice).",
        "",
        "- Sweep commands (`sweep_commands.txt`): "
        + ("; ".join(f"`{c}`" for c in _lines_of(results_dir / "sweep_commands.txt")) or "not recorded"),
        f"- Training machine(s), recorded with the runs: {machines(rows)}",
        "- Cost commands (`cost_commands.txt`): "
        + ("; ".join(f"`{c}`" for c in _lines_of(results_dir / "cost_commands.txt")) or "none"),
        f"- Total training wall time of the runs: {sum(r['wall_seconds'] for r in rows) / 3600:.2f} h "
        "(runs shared the machine; the throughput columns come from `cost.csv`, measured alone)",
        f"- Runs finished: {finished_span(rows)}",
        "",
    ]
    by_dataset: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_dataset[row["dataset"]].append(row)
    for dataset in sorted(by_dataset):
        lines += _dataset_section(results_dir, dataset, by_dataset[dataset], costs)
    if any(c["variant"] == "sparse" for c in costs):
        lines += [SPARSE_FLOPS_NOTE, ""]
    notes = results_dir / "NOTES.md"
    if notes.is_file():
        lines += ["## Notes", "", notes.read_text().strip(), ""]
    path = results_dir / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
