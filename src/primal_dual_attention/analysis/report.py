"""``pda report``: gather whatever exists under ``results/`` into ``results/README.md``.

One section per claim of the paper (less head redundancy, higher accuracy, lower cost) plus the
framework check; each links the sub-report that states its command, protocol, seeds, budget and
machine. Missing results are listed as such, never filled in.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from primal_dual_attention.analysis.uea_report import (
    complete_datasets,
    read_runs,
    score_grid,
    seed_std,
    summary_statistics,
)
from primal_dual_attention.data.uea import PAPER_DATASETS

#: each claim section states the paper's claim; what the results say comes beneath it
TESTED = "(the paper's, tested here)"


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _redundancy_section(root: Path) -> list[str]:
    lines = [f"## Claim 1 {TESTED}: BN and SH reduce head redundancy", ""]
    files = sorted(root.glob("heads/*/redundancy.csv"))
    if not files:
        return lines + ["Not measured yet (`pda heads CHECKPOINT ...`).", ""]
    for path in files:
        rows = _read_csv(path)
        # per model: the layer-mean of each metric, one value per seed (labels "variant (seed k)")
        per_model: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(
            lambda: defaultdict(list)))
        for row in rows:
            model = row["label"].split(" (seed")[0]
            for name in ("js", "cos_maps", "cos_out"):
                per_model[model][row["label"]][name].append(float(row[name]))
        lines += [f"### {path.parent.name} ([details]({path.parent.relative_to(root)}/README.md))", "",
                  "Mean over layers, then mean ± sample std over seeds (js: higher = less redundant; "
                  "cosines: lower = less redundant). `vs softmax`: whether the model's mean is less "
                  "redundant than softmax's by both js and cos_maps, more by both, or mixed; `within "
                  "spread` where both differences are below the larger seed std of the two (no test "
                  "of significance):", "",
                  "| model | seeds | js | cos_maps | cos_out | vs softmax |", "|---|---|---|---|---|---|"]
        seed_values = {model: {name: [float(np.mean(run[name])) for run in runs.values()]
                               for name in ("js", "cos_maps")} for model, runs in per_model.items()}
        for model, runs in per_model.items():
            cells = []
            for name in ("js", "cos_maps", "cos_out"):
                values = [np.mean(run[name]) for run in runs.values()]
                spread = f" ± {seed_std(values):.3f}" if len(values) > 1 else ""
                cells.append(f"{np.mean(values):.3f}{spread}")
            verdict = (_versus_softmax(seed_values[model], seed_values.get("softmax")) if model != "softmax"
                       else "–")
            lines.append(f"| {model} | {len(runs)} | " + " | ".join(cells) + f" | {verdict} |")
        lines += ["", f"![redundancy]({path.parent.relative_to(root)}/redundancy.png)", ""]
    return lines


def _versus_softmax(model: dict[str, list[float]], softmax: dict[str, list[float]] | None) -> str:
    """From each metric's per-seed values: ``within spread`` when both mean differences are
    below the larger seed std of the two, else ``less``/``more`` redundant than softmax by both js
    (higher = less) and cos_maps (lower = less), else ``mixed``; ``–`` without a softmax row."""
    if softmax is None:
        return "–"
    differences = {name: float(np.mean(model[name]) - np.mean(softmax[name])) for name in ("js", "cos_maps")}
    spreads = {name: max(seed_std(model[name]), seed_std(softmax[name])) for name in ("js", "cos_maps")}
    if all(abs(differences[name]) < spreads[name] for name in differences):
        return "within spread"
    less = (differences["js"] > 0, differences["cos_maps"] < 0)
    return "less" if all(less) else "more" if not any(less) else "mixed"


def _accuracy_section(root: Path) -> list[str]:
    lines = [f"## Claim 2 {TESTED}: higher accuracy", ""]
    runs_csv = root / "uea" / "runs.csv"
    if runs_csv.is_file():
        rows = read_runs(runs_csv)
        lines += ["UEA time-series classification ([full tables, protocols, budget](uea/README.md)); "
                  "average test accuracy (%) over the datasets where every variant has 3 seeds:", ""]
        for table in ("main", "extended"):
            for protocol in ("paper", "clean"):
                subset = [r for r in rows if r["table"] == table and r["protocol"] == protocol]
                if not subset:
                    continue
                datasets, variants, scores = score_grid(subset)
                complete = complete_datasets(datasets, variants, scores, 3)
                if not complete:
                    lines += [f"- {table} table, `{protocol}`: runs in progress, no dataset complete.", ""]
                    continue
                stats = summary_statistics(complete, variants, scores)
                lines += [f"**{table} table, `{protocol}` protocol, {len(complete)} dataset(s)**", "",
                          "| variant | avg. accuracy | avg. rank | W/T/L vs softmax |", "|---|---|---|---|"]
                for variant in variants:
                    s = stats[variant]
                    wtl = f"{s['wins']}/{s['ties']}/{s['losses']}" if "wins" in s else "–"
                    lines.append(f"| {variant} | {s['average']:.2f} | {s['rank']:.2f} | {wtl} |")
                lines.append("")
                plot = root / "uea" / f"{table}_{protocol}_bars.png"
                if plot.is_file():
                    lines += [f"![{table} {protocol}](uea/{plot.name})", ""]
    else:
        lines += ["UEA: not run yet (`pda sweep`).", ""]
    cifar = root / "cifar10" / "README.md"
    lines += (["CIFAR-10: see [cifar10/README.md](cifar10/README.md).", ""] if cifar.is_file()
              else ["CIFAR-10 (vision): not run yet.", ""])
    return lines


def _cost_section(root: Path) -> list[str]:
    lines = [f"## Claim 3 {TESTED}: SH costs less", ""]
    attention_md = root / "bench" / "attention.md"
    if attention_md.is_file():
        text = attention_md.read_text()
        targets = text[text.index("Targets at"):] if "Targets at" in text else ""
        lines += ["One attention call, forward+backward ([full table](bench/attention.md)):", "", targets, ""]
    scaling_md = root / "bench" / "scaling.md"
    if scaling_md.is_file():
        table = [line for line in scaling_md.read_text().splitlines() if line.startswith("|")]
        exponents = [f"| {c[1].strip()} | {c[2].strip()} |" for c in
                     (line.split("|") for line in table[2:])]
        lines += ["One attention layer as N grows ([details](bench/scaling.md)); growth exponent of the "
                  "time (2 = quadratic, 1 = linear):", "", "| variant | exponent |", "|---|---|",
                  *exponents, "", "![scaling](bench/scaling.png)", ""]
    for machine in ("gpu", "gpu_cudagraphs", "cpu"):
        if (root / "speed" / machine / "speed.md").is_file():
            lines += [f"Whole models, training step per variant and its ratio to softmax, eager and compiled "
                      f"({machine}): [speed/{machine}/speed.md](speed/{machine}/speed.md).", ""]
    if len(lines) == 2:
        lines += ["Not measured yet (`pda bench attention`, `pda bench scaling`).", ""]
    return lines


def _framework_section(root: Path) -> list[str]:
    verify = root / "verify" / "verify.md"
    lines = ["## The framework: attention is the dual of an SVR", ""]
    if not verify.is_file():
        return lines + ["Not checked yet (`pda verify`).", ""]
    text = verify.read_text()
    holds = "All exact statements hold: yes" in text
    count = sum(1 for line in text.splitlines()  # every statement row, holding or not
                if line.startswith("| ") and (line.endswith(" yes |") or line.endswith(" **NO** |")))
    lines += [f"`pda verify`: {count} exact statements checked in float64; all hold: "
              f"{'yes' if holds else 'NO'} ([report](verify/verify.md)).", "",
              "![random features](verify/softmax_random_features.png)", ""]
    return lines


def _sweep_links(root: Path) -> list[str]:
    """Links to the CIFAR-10 and LRA reports, with the mean test accuracy per variant."""
    lines = []
    for folder, title in (("cifar10", "CIFAR-10 (timm ViTs)"), ("lra", "Long Range Arena (CPU budget)"),
                          ("lra/listops_5000_steps_lr5e-4",
                           "Long Range Arena ListOps (the published 5,000 steps, lr 5e-4)"),
                          ("lra/listops_5000_steps", "Long Range Arena ListOps (the published 5,000 steps "
                                                     "and lr 1e-4)"),
                          ("lra_gpu", "Long Range Arena (GPU, short budget)"),
                          ("lra_gpu/history_budget_0.0135", "Long Range Arena (GPU, 1.35 % budget, history)"),
                          ("lra/history_issue8", "Long Range Arena (issue-8 CPU budget, history)")):
        runs = root / folder / "runs.csv"
        if not runs.is_file():
            continue
        rows = _read_csv(runs)
        lines += [f"## {title}", "", f"[{folder}/README.md]({folder}/README.md): tables, budgets, costs, "
                  "plots and notes. Mean test accuracy (%) per dataset and variant:", ""]
        for dataset in sorted({r["dataset"] for r in rows}):
            means = {}
            for row in rows:
                if row["dataset"] == dataset:
                    means.setdefault(row["variant"], []).append(100 * float(row["test_acc"]))
            lines.append(f"- {dataset}: " + ", ".join(
                f"{v} {sum(a) / len(a):.2f} (n={len(a)})" for v, a in means.items()))
        lines.append("")
    if (root / "lm" / "README.md").is_file():
        lines += ["## Byte-level language model", "", "[lm/README.md](lm/README.md): test bits per byte per "
                  "variant over seeds, training and generation cost, commands and notes.", ""]
    return lines


REPORT_MARK = "Generated by `pda report`"


def write_report(results_dir: str | Path = "results") -> Path:
    """Gather the sub-reports under ``results_dir`` into its README.md; a README that this
    function did not write (say, a project's own) is never overwritten."""
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--results {str(root)!r} is not a folder (expected a results folder such "
                                "as results/)")
    path = root / "README.md"
    if path.is_file() and REPORT_MARK not in path.read_text(errors="replace"):
        raise ValueError(f"--results {str(root)!r}: its README.md was not written by pda report, so it is "
                         "not replaced; name the results folder (e.g. results/)")
    runs_csv = root / "uea" / "runs.csv"
    run_here = {row["dataset"] for row in read_runs(runs_csv)} if runs_csv.is_file() else set()
    missing = [d for d in PAPER_DATASETS if d not in run_here]
    lines = ["# Results", "",
             f"{REPORT_MARK} from the files under `results/` alone (no clock, no "
             "machine: it regenerates byte for byte). Every number below comes from the linked "
             "sub-report, which names its command, protocol, seeds, budget and machine.", ""]
    lines += _framework_section(root) + _redundancy_section(root) + _accuracy_section(root)
    lines += _cost_section(root) + _sweep_links(root)
    lines += ["## Not run here", "",
              f"- UEA datasets of the paper's table without runs in `uea/runs.csv`: {', '.join(missing)} "
              "(`pda sweep --data-dir` runs them where they exist; aeon downloads them by name with "
              "internet).",
              "- ImageNet (DeiT): recipe and configs only (`configs/imagenet/`); Long Range Arena "
              + ("Text, Image, Pathfinder and Retrieval at the published budgets (ListOps: its sections "
                 "above)." if (root / "lra" / "listops_5000_steps_lr5e-4" / "runs.csv").is_file()
                 else "at the published budgets."), ""]
    path.write_text("\n".join(lines) + "\n")
    return path
