"""``results/lra/NOTES.md`` for the LRA report (issue 16): the hand-written notes
(``notes_prose.md``), then two generated sections — what each run cost on its machine (time per
1,000 training steps and per evaluation round, from the runs' own logs; peak memory from
``cost.csv``), for this folder's table and the 5,000-step tables in its subfolders, and the
history rows of ``history_issue8/`` (the chance-level budgets of issue 8).
``pda sweep --report-only`` then puts NOTES.md under the new tables of README.md.

Usage: python scripts/lra_report.py results/lra > results/lra/NOTES.md
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import yaml

ORDER = ("softmax", "linear", "bn", "sh", "bn_sh")
# the tables whose runs the cost section lists: subfolder ("" = the folder itself) and its label
TABLES = (("", "this folder"), ("listops_5000_steps", "[5,000 steps](listops_5000_steps/README.md)"),
          ("listops_5000_steps_lr5e-4", "[5,000 steps, lr 5e-4](listops_5000_steps_lr5e-4/README.md)"))


def _csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _config(results: Path, row: dict) -> dict:
    path = (results / "logs" / row["dataset"] / row["protocol"] / row["variant"]
            / f"seed{row['seed']}.yaml")
    return yaml.safe_load(path.read_text())


def _steps(cfg: dict) -> int:
    return max(cfg["epochs"], round(cfg["steps"] * cfg["budget"]))


def probe_peaks(results: Path) -> dict[tuple[str, str], float]:
    """Largest peak RSS (MiB) per (task, variant) over the eager bf16 rows of ``probe_cpu.md``."""
    peaks: dict[tuple[str, str], float] = {}
    path = results / "probe_cpu.md"
    for line in path.read_text().splitlines() if path.is_file() else []:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 13 and cells[2] == "bf16" and cells[4] == "no":
            key = (cells[0], cells[1])
            peaks[key] = max(peaks.get(key, 0.0), float(cells[12]))
    return peaks


def _cost_rows(folder: Path, label: str, rss: dict[tuple[str, str], float]) -> list[str]:
    """One row per finished run of ``folder`` (its runs.csv, logs and cost.csv)."""
    peaks = {(c["dataset"], c["variant"]): c for c in _csv(folder / "cost.csv")}
    key = {v: i for i, v in enumerate(ORDER)}
    rows = []
    for row in sorted(_csv(folder / "runs.csv"),
                      key=lambda r: (r["dataset"], key.get(r["variant"], 99), int(r["seed"]))):
        cfg = _config(folder, row)
        log = _csv(folder / "logs" / row["dataset"] / row["protocol"] / row["variant"]
                   / f"seed{row['seed']}.csv")
        steps = _steps(cfg)
        train_s = sum(float(r["epoch_seconds"]) for r in log)
        eval_s = (float(row["wall_seconds"]) - train_s) / max(1, len(log))
        peak = peaks.get((row["dataset"], row["variant"]))
        if peak:
            bench = f"bench {peak['precision']}, batch {peak['batch']}"
            peak_cell = f"{float(peak['peak_train_mb']):,.0f} ({bench})"
        elif (row["dataset"], row["variant"]) in rss:
            peak_cell = f"{rss[(row['dataset'], row['variant'])]:,.0f} (process RSS)"
        else:
            peak_cell = "–"
        rows.append(f"| {label} | {row['dataset']} | {row['variant']} | {row['seed']} | "
                    f"{steps} x {cfg['batch_size']} | {cfg['precision']} | {1000 * train_s / steps:,.0f} | "
                    f"{eval_s:,.0f} | {float(row['wall_seconds']) / 3600:.2f} | {peak_cell} |")
    return rows


def cost_section(results: Path) -> list[str]:
    rss = probe_peaks(results)
    out = ["### Cost per task on the training machine", "",
           "From each finished run's own log (`logs/<task>/clean/<variant>/seed<k>.csv`): training "
           "seconds per 1,000 steps (sum of the rounds' training time / steps), seconds per "
           "evaluation round (validation + test), and the run's wall time; the runs shared the "
           "machine with each other and with other work, so these are contended times. Peak "
           "memory: the timing probe's peak resident set of the whole training process (model, "
           "optimizer, activations, data and Python) at the training batch, eager bf16 "
           "([probe_cpu.md](probe_cpu.md)); `pda bench model` rows (each table's `cost.csv`) where "
           "present. This folder's table, then the 5,000-step ListOps tables.", "",
           "| table | task | variant | seed | steps x batch | precision | train s / 1k steps | "
           "eval s / round | wall h | peak MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for folder, label in TABLES:
        out += _cost_rows(results / folder, label, rss)
    out.append("")
    out.append("(`eval s / round` is the wall time not spent in training steps, per round: evaluation, "
               "checkpoints and data loading.)")
    return out + [""]


def history_section(results: Path) -> list[str]:
    folder = results / "history_issue8"
    runs = _csv(folder / "runs.csv")
    if not runs:
        return []
    out = ["### History: the chance-level budgets of issue 8", "",
           "Kept for the record only; these budgets were far too small to learn (every variant at "
           "the majority class or chance). Full tables, costs and commands: "
           "[history_issue8/README.md](history_issue8/README.md) (Intel Xeon, 2 cores, fp32).", "",
           "| task | steps run (of published) | " + " | ".join(ORDER) + " |",
           "|---|---|" + "---|" * len(ORDER)]
    for dataset in sorted({r["dataset"] for r in runs}):
        rows = {r["variant"]: r for r in runs if r["dataset"] == dataset}
        cfg = _config(folder, next(iter(rows.values())))
        cells = [f"{100 * float(rows[v]['test_acc']):.2f}" if v in rows else "–" for v in ORDER]
        out.append(f"| {dataset} | {_steps(cfg)} of {cfg['steps']} (batch {cfg['batch_size']}) | "
                   + " | ".join(cells) + " |")
    return out + [""]


def main() -> None:
    results = Path(sys.argv[1] if len(sys.argv) > 1 else "results/lra")
    prose = results / "notes_prose.md"
    lines = [prose.read_text().strip(), ""] if prose.is_file() else []
    lines += cost_section(results) + history_section(results)
    print("\n".join(lines).rstrip())


if __name__ == "__main__":
    main()
