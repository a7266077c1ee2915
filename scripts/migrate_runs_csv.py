"""One-off migration of the committed ``runs.csv`` files (issue 15), run once from the
repository root: ``python scripts/migrate_runs_csv.py``.

Each row gains the two columns that ``training/sweep.py`` now writes with every run:

- ``budget``: the run's ``budget`` option, from the config logged beside it
  (``logs/<dataset>/<protocol>/<variant>/seed<k>.yaml``, present for LRA); runs without a logged
  config were not step-budgeted (UEA, CIFAR-10) and get 1, the default;
- ``machine``: the machine the folder recorded when the runs were made: its ``machines.txt``
  (one line in every folder that has one), or, for ``results/uea``, which had none, the
  ``Machine:`` line of the README generated from those runs.

The reports then read the machine from the rows, so ``pda sweep --report-only`` gives the same
README on any computer. Rows and values are otherwise unchanged.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import yaml

from primal_dual_attention.training.sweep import RUN_COLUMNS


def recorded_machine(folder: Path) -> str:
    machines = folder / "machines.txt"
    if machines.is_file():
        (line,) = [line for line in machines.read_text().splitlines() if line.strip()]
        return line
    return re.search(r"^- Machine: (.+)$", (folder / "README.md").read_text(), re.MULTILINE).group(1)


def migrate(runs_csv: Path) -> None:
    folder = runs_csv.parent
    with open(runs_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and "machine" in rows[0]:
        return
    machine = recorded_machine(folder)
    for row in rows:
        logged = (folder / "logs" / row["dataset"] / row["protocol"] / row["variant"]
                  / f"seed{row['seed']}.yaml")
        budget = yaml.safe_load(logged.read_text())["budget"] if logged.is_file() else 1.0
        row |= {"budget": f"{budget:g}", "machine": machine}
    with open(runs_csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RUN_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"{runs_csv}: {len(rows)} rows, machine {machine!r}")


if __name__ == "__main__":
    for path in sorted(Path("results").rglob("runs.csv")):
        migrate(path)
