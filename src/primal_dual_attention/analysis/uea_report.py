"""``results/uea/README.md`` from the sweep's ``runs.csv``: tables, ranks, tests and plots.

Everything printed is computed from the CSV rows; the prose around the numbers states what
they support. Accuracy is reported in percent, mean ± standard deviation over seeds (the
sample standard deviation, n - 1 in the denominator, as every report of the project uses).
"""

from __future__ import annotations

import csv
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from primal_dual_attention.attention import VARIANTS

BASELINE = "softmax"


def read_runs(results_csv: Path) -> list[dict]:
    with open(results_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["test_acc"] = float(row["test_acc"])
        for key in ("epoch_seconds", "train_samples_per_s", "wall_seconds"):
            row[key] = float(row[key])
    return rows


def machines(rows: list[dict]) -> str:
    """The machines recorded with the runs (``runs.csv``), each with its number of runs, in the
    order they first appear: the report credits the hardware that made the numbers."""
    counts = Counter(row.get("machine") or "not recorded" for row in rows)
    return "; ".join(f"{machine} ({count} runs)" for machine, count in counts.items())


def finished_span(rows: list[dict]) -> str:
    """When the first and the last run finished (UTC), from ``runs.csv``."""
    stamps = sorted(row["finished_at"] for row in rows)
    return f"{stamps[0]} to {stamps[-1]}" if stamps else "no run"


def dataset_labels(rows: list[dict]) -> list[str]:
    """Each row's dataset; a dataset held at several budgets (``--allow-mixed``) is named with its
    budget, so that runs of different budgets never read as seeds of one run."""
    budgets: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for row in rows:
        budgets[row["dataset"]].add(run_budget(row))
    return [row["dataset"] + (" ({} epochs, budget {})".format(*run_budget(row))
                              if len(budgets[row["dataset"]]) > 1 else "") for row in rows]


def score_grid(rows: list[dict]) -> tuple[list[str], list[str], dict[tuple[str, str], list[float]]]:
    """Datasets (sorted, see :func:`dataset_labels`), variants (registry order) and test
    accuracies in % per (dataset, variant)."""
    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row, dataset in zip(rows, dataset_labels(rows), strict=True):
        scores[(dataset, row["variant"])].append(100 * row["test_acc"])
    datasets = sorted({d for d, _ in scores})
    present = {r["variant"] for r in rows}
    variants = [v for v in VARIANTS if v in present]  # registry order: softmax first
    return datasets, variants, scores


def run_budget(row: dict) -> tuple[str, str]:
    """A run's budget as ``runs.csv`` records it: (epochs, fraction of the configured steps)."""
    return str(row["epochs"]), str(row.get("budget") or 1)


def mean_std(values, digits: int) -> str:
    """``mean ± sample std`` over seeds, or the mean alone for one seed (a spread of one value
    is undefined, and SPEC §4 asks for at least 3 seeds)."""
    values = np.asarray(values, dtype=float)
    spread = f" ± {seed_std(values):.{digits}f}" if values.size > 1 else ""
    return f"{values.mean():.{digits}f}{spread}"


def complete_datasets(datasets, variants, scores, seeds: int) -> list[str]:
    """Datasets on which every variant has all ``seeds`` runs."""
    return [d for d in datasets if all(len(scores.get((d, v), [])) >= seeds for v in variants)]


def seed_std(values) -> float:
    """The spread over seeds every report gives: the sample standard deviation (ddof 1), which
    does not understate it for the few seeds a run affords; 0 for a single seed."""
    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1)) if values.size > 1 else 0.0


def accuracy_table(datasets, variants, scores) -> list[str]:
    lines = ["| dataset | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for dataset in datasets:
        means = {v: np.mean(scores[(dataset, v)]) for v in variants if scores.get((dataset, v))}
        best = max(means.values()) if means else None
        cells = []
        for v in variants:
            values = scores.get((dataset, v), [])
            if not values:
                cells.append("–")
                continue
            text = mean_std(values, 1) + (
                f" (n={len(values)})" if len(values) != 3 else "")
            cells.append(f"**{text}**" if means[v] == best else text)
        lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
    return lines


def summary_statistics(datasets, variants, scores) -> dict[str, dict[str, float]]:
    """Average accuracy, average rank, W/T/L and Wilcoxon p against softmax, per variant."""
    from scipy.stats import rankdata, wilcoxon

    means = np.array([[np.mean(scores[(d, v)]) for v in variants] for d in datasets])
    ranks = np.array([rankdata(-row) for row in means])
    stats = {}
    base = means[:, variants.index(BASELINE)] if BASELINE in variants else None
    for j, variant in enumerate(variants):
        entry = {"average": float(means[:, j].mean()), "rank": float(ranks[:, j].mean())}
        if base is not None and variant != BASELINE:
            diff = means[:, j] - base
            entry |= {"wins": int((diff > 1e-9).sum()), "ties": int((np.abs(diff) <= 1e-9).sum()),
                      "losses": int((diff < -1e-9).sum())}
            nonzero = diff[np.abs(diff) > 1e-9]
            entry["wilcoxon_p"] = float(wilcoxon(nonzero).pvalue) if len(nonzero) >= 1 else math.nan
        stats[variant] = entry
    return stats


def bar_plot(datasets, variants, scores, path: Path, title: str) -> None:
    """Each variant's accuracy minus softmax's, per dataset (mean over seeds); the error bar is
    the standard error of that difference of means, sqrt(s_v^2 / n_v + s_softmax^2 / n_softmax)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [v for v in variants if v != BASELINE]
    width = 0.8 / max(1, len(others))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(datasets) + 3), 4))
    x = np.arange(len(datasets))
    for j, variant in enumerate(others):
        delta = [np.mean(scores[(d, variant)]) - np.mean(scores[(d, BASELINE)]) for d in datasets]
        error = [math.sqrt(sum(seed_std(scores[(d, v)]) ** 2 / len(scores[(d, v)])
                               for v in (variant, BASELINE))) for d in datasets]
        ax.bar(x + (j - (len(others) - 1) / 2) * width, delta, width, yerr=error, capsize=2, label=variant)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, datasets, rotation=30, ha="right")
    ax.set_ylabel("test accuracy minus softmax (points)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cd_diagram(datasets, variants, scores, path: Path) -> bool:
    """aeon's critical difference diagram; False when there are too few datasets, or fewer than
    the 3 variants its Friedman test needs."""
    if len(datasets) < 2 or len(variants) < 3:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from aeon.visualisation import plot_critical_difference

    table = np.array([[np.mean(scores[(d, v)]) for v in variants] for d in datasets])
    fig, _ = plot_critical_difference(table, variants, alpha=0.1)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def _section(rows, table: str, protocol: str, out_dir: Path, seeds: int) -> list[str]:
    datasets, variants, scores = score_grid(rows)
    # a dataset held at several budgets would count as several datasets in the statistics
    labels = dataset_labels(rows)
    several = sorted({label for row, label in zip(rows, labels, strict=True) if label != row["dataset"]})
    complete = [d for d in complete_datasets(datasets, variants, scores, seeds) if d not in several]
    stem = f"{table}_{protocol}"
    lines = [f"### {table.capitalize()} table, protocol `{protocol}`", ""]
    lines += accuracy_table(datasets, variants, scores)
    lines.append("")
    if several:
        lines += [f"Held at several budgets (`--allow-mixed`), so left out of the statistics below: "
                  f"{', '.join(several)}.", ""]
    if len(complete) < len(datasets) - len(several):
        missing = sorted(set(datasets) - set(complete) - set(several))
        lines.append(f"Fewer than {seeds} seeds for some variant (still running, or not run; SPEC §4 "
                     f"asks for at least 3): {', '.join(missing)}; left out of the statistics below.")
        lines.append("")
    if complete:
        stats = summary_statistics(complete, variants, scores)
        lines += [f"Over the {len(complete)} complete dataset(s): average accuracy, average rank "
                  "(1 = best), and each variant against softmax (wins/ties/losses of the mean "
                  "accuracy; two-sided Wilcoxon signed-rank p over datasets).", "",
                  "| variant | average | avg. rank | W/T/L vs softmax | Wilcoxon p |",
                  "|---|---|---|---|---|"]
        for variant in variants:
            s = stats[variant]
            wtl = f"{s['wins']}/{s['ties']}/{s['losses']}" if "wins" in s else "–"
            p = f"{s['wilcoxon_p']:.3f}" if "wilcoxon_p" in s and not math.isnan(s["wilcoxon_p"]) else "–"
            lines.append(f"| {variant} | {s['average']:.2f} | {s['rank']:.2f} | {wtl} | {p} |")
        lines.append("")
        plot = out_dir / f"{stem}_bars.png"
        bar_plot(complete, variants, scores, plot, f"UEA {table} table ({protocol} protocol)")
        lines += [f"![accuracy minus softmax per dataset]({plot.name})", "",
                  "(Bars: mean accuracy minus softmax's; error bars: the standard error of that "
                  "difference over seeds.)", ""]
        cd = out_dir / f"{stem}_cd.png"
        if cd_diagram(complete, variants, scores, cd):
            lines += [f"Critical difference diagram (aeon, α = 0.1): ![CD]({cd.name})", ""]
        lines += _verdict(complete, variants, stats)
    lines += ["", "Training cost: median seconds per training epoch (train samples/s), per dataset. "
              "Measured while the sweep's worker processes shared the machine's cores, one torch "
              "thread each, so they are indicative only; `pda bench` has clean timings.", "",
              "| dataset | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for dataset in datasets:
        cells = []
        for variant in variants:
            mine = [r for r, label in zip(rows, labels, strict=True)
                    if r["variant"] == variant and label == dataset]
            cells.append("–" if not mine else
                         f"{np.median([r['epoch_seconds'] for r in mine]):.2f} "
                         f"({np.median([r['train_samples_per_s'] for r in mine]):.0f})")
        lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
    return lines + [""]


def _verdict(datasets, variants, stats) -> list[str]:
    """Plain statements of what the table supports, derived from the statistics."""
    if BASELINE not in variants:
        return []
    n = len(datasets)
    out = ["What this supports:", ""]
    for variant in variants:
        if variant == BASELINE:
            continue
        s = stats[variant]
        delta = s["average"] - stats[BASELINE]["average"]
        significant = not math.isnan(s.get("wilcoxon_p", math.nan)) and s["wilcoxon_p"] < 0.05
        out.append(
            f"- `{variant}`: {delta:+.2f} points on average over softmax, better on {s['wins']} of {n} "
            f"dataset(s); {'a significant' if significant else 'no significant'} difference at 5 % "
            f"(Wilcoxon p = {s['wilcoxon_p']:.3f})." if not math.isnan(s.get("wilcoxon_p", math.nan))
            else f"- `{variant}`: {delta:+.2f} points on average over softmax; identical means, no test.")
    if n < 6:
        out.append(f"- With {n} datasets the smallest two-sided Wilcoxon p attainable is "
                   f"{2 / 2 ** n:.3f}, so this table cannot show a significant difference on its own.")
    return out + [""]


def write_uea_report(results_dir: str | Path, seeds: int = 3) -> Path:
    results_dir = Path(results_dir)
    rows = read_runs(results_dir / "runs.csv")
    commands_file = results_dir / "sweep_commands.txt"
    commands = commands_file.read_text().splitlines() if commands_file.is_file() else []
    lines = [
        "# UEA multivariate time-series classification",
        "",
        "Generated by `pda sweep --report-only` from `runs.csv` (one row per finished run; the "
        "per-epoch logs are under `logs/`). Accuracy on the test split in %, mean ± sample std over "
        "seeds (n=3 unless marked); bold = best mean in the row.",
        "",
        "- Sweep commands (each run once or resumed; `sweep_commands.txt`): "
        + ("; ".join(f"`{c}`" for c in commands) or "not recorded"),
        f"- Machine(s), recorded with the runs: {machines(rows)}",
        f"- Total training wall time of the runs: {sum(r['wall_seconds'] for r in rows) / 3600:.2f} h",
        f"- Runs finished: {finished_span(rows)}",
        "- Protocols (SPEC §4): `paper` reports the best test accuracy over epochs (what the "
        "published UEA tables do; optimistic); `clean` selects the epoch on a stratified 20 % "
        "validation split of the training data and reports its test accuracy. Channels are "
        "standardised with the whole training file's statistics (validation part included, without "
        "labels; never the test file's).",
        "- Model and budget: the field's standard set-up unless the dataset's "
        "`configs/uea/<Dataset>.yaml` says otherwise; epochs per run are in `runs.csv`.",
        "",
    ]
    budgets = sorted({(r["dataset"], r["epochs"]) for r in rows})
    lines += ["Epoch budget per dataset: " + ", ".join(f"{d} {e}" for d, e in budgets), ""]
    for table in ("main", "extended"):
        for protocol in ("paper", "clean"):
            subset = [r for r in rows if r["table"] == table and r["protocol"] == protocol]
            if subset:
                lines += _section(subset, table, protocol, results_dir, seeds)
    path = results_dir / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
