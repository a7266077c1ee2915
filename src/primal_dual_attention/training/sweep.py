"""Resumable sweeps: the UEA main and extended tables (SPEC.md §4), CIFAR-10 and LRA.

A sweep is a list of runs (dataset x protocol x variant x seed) of one task, run in the sweep's
own folder: run folders, ``runs.csv`` (one row per finished run, with the machine it ran on),
``logs/`` and ``sweep_commands.txt`` (the commands that finished). Finished runs are skipped;
an interrupted run continues from its ``last.pt``. Rows are appended under a file lock, so
several worker processes (``--workers``) can share one sweep, and a sweep can be stopped and
continued in a later session. :func:`merge_results` adds a finished sweep's rows to a committed
results folder, append-only (issue 15).
"""

from __future__ import annotations

import csv
import fcntl
import filecmp
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from primal_dual_attention.attention import PAPER_VARIANTS, STUDIED_VARIANTS, variant_names
from primal_dual_attention.data.uea import PAPER_DATASETS, available_datasets
from primal_dual_attention.training.config import (
    TrainConfig,
    bundled_config,
    canonical_task,
    config_from_mapping,
)
from primal_dual_attention.utils import machine_description

#: The UEA main table: the studied variants but the sparse window (short series need none).
MAIN_VARIANTS = variant_names(lambda v: v.name in STUDIED_VARIANTS and not v.sparse)
#: The UEA extended table: the paper's four.
EXTENDED_VARIANTS = PAPER_VARIANTS
SEEDS = (0, 1, 2)
RUN_COLUMNS = ["table", "dataset", "protocol", "variant", "seed", "epochs", "budget", "test_acc",
               "best_epoch", "params", "epoch_seconds", "train_samples_per_s", "wall_seconds", "threads",
               "finished_at", "machine"]
KEY_COLUMNS = ("table", "dataset", "protocol", "variant", "seed", "epochs", "budget")


def run_key(table: str, cfg: TrainConfig) -> tuple[str, ...]:
    """What identifies a run's row: table, dataset, protocol, variant, seed and budget (epochs,
    budget)."""
    return (table, cfg.dataset, cfg.protocol, cfg.variant, str(cfg.seed), str(cfg.epochs), f"{cfg.budget:g}")


def row_key(row: dict[str, str]) -> tuple[str, ...]:
    return tuple(row[column] for column in KEY_COLUMNS)


def plan_runs(
    table: str,
    task: str,
    datasets: Sequence[str],
    *,
    protocols: Sequence[str],
    seeds: Sequence[int],
    variants: Sequence[str],
    data_dir: str | Path | None = None,
    epochs: int | None = None,
    epochs_per_dataset: dict[str, int] | None = None,
    overrides: dict[str, Any] | None = None,
    out_dir: str = "runs/sweep",
) -> list[tuple[str, TrainConfig]]:
    """Every (dataset, protocol, seed, variant) run of one task, in that nesting order.

    Each dataset starts from its bundled config (``configs/<task>/<dataset>.yaml``), then
    ``overrides`` (any :class:`TrainConfig` options), then ``epochs`` and, per dataset,
    ``epochs_per_dataset`` — budgets are uniform across variants and seeds by construction.
    """
    runs = []
    for dataset in datasets:
        base = TrainConfig(task=task, dataset=dataset, out_dir=out_dir, progress=False,
                           data_dir=None if data_dir is None else str(data_dir))
        base = bundled_config(task, dataset, base)
        if overrides:
            base = config_from_mapping(overrides, "sweep --set", base)
        per_dataset = epochs_per_dataset or {}  # by the name given or the task's own (lra-listops: listops)
        budget = per_dataset.get(dataset, per_dataset.get(canonical_task(task, dataset)[1], epochs))
        if budget is not None:
            base = replace(base, epochs=budget)
        for protocol in protocols:
            for seed in seeds:
                for variant in variants:
                    runs.append((table, replace(base, protocol=protocol, seed=seed, variant=variant,
                                                resume=True).validate()))
    return runs


def plan_sweep(
    table: str,
    data_dir: str | Path | None = None,
    *,
    datasets: Sequence[str] | None = None,
    protocols: Sequence[str] = ("paper", "clean"),
    seeds: Sequence[int] = SEEDS,
    variants: Sequence[str] | None = None,
    epochs: int | None = None,
    epochs_per_dataset: dict[str, int] | None = None,
    overrides: dict[str, Any] | None = None,
    out_dir: str = "runs/sweep",
) -> list[tuple[str, TrainConfig]]:
    """The UEA runs of ``table`` ("main" or "extended") for the datasets found in ``data_dir``.

    Main: the paper's datasets present here, ``MAIN_VARIANTS``, both protocols. Extended: every
    other dataset, ``EXTENDED_VARIANTS``, clean protocol only.
    """
    if table not in ("main", "extended"):
        raise ValueError(f"table must be 'main' or 'extended', got {table!r}")
    found = available_datasets(data_dir)
    if datasets is None:
        paper = [d for d in found if d in PAPER_DATASETS]
        datasets = paper if table == "main" else [d for d in found if d not in PAPER_DATASETS]
    if table == "extended":
        protocols = [p for p in protocols if p == "clean"]
    variants = variants or (MAIN_VARIANTS if table == "main" else EXTENDED_VARIANTS)
    return plan_runs(table, "uea", datasets, protocols=protocols, seeds=seeds, variants=variants,
                     data_dir=data_dir, epochs=epochs, epochs_per_dataset=epochs_per_dataset,
                     overrides=overrides, out_dir=out_dir)


def read_rows(results_csv: Path) -> list[dict[str, str]]:
    """The rows of a ``runs.csv`` as written (none when there is no file); a file of another
    layout is an error naming its columns."""
    if not results_csv.is_file():
        return []
    with open(results_csv, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames != RUN_COLUMNS:
            raise ValueError(f"{results_csv} has the columns {reader.fieldnames}, expected {RUN_COLUMNS}")
        return list(reader)


def finished_runs(results_csv: Path) -> set[tuple[str, ...]]:
    return {row_key(r) for r in read_rows(results_csv)}


def _append_rows(results_csv: Path, rows: Sequence[dict]) -> None:
    results_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(results_csv, "a", newline="") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            writer = csv.DictWriter(handle, fieldnames=RUN_COLUMNS)
            if handle.seek(0, os.SEEK_END) == 0:  # the size now, under the lock (another may have written)
                writer.writeheader()
            writer.writerows(rows)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record_commands(folder: Path, commands: Sequence[str]) -> None:
    """Append to ``sweep_commands.txt`` the finished commands it does not list yet."""
    path = folder / "sweep_commands.txt"
    known = path.read_text().splitlines() if path.is_file() else []
    new = [c for c in dict.fromkeys(commands) if c not in known]
    if new:
        with open(path, "a") as handle:
            handle.write("".join(c + "\n" for c in new))


def _log_files(row: dict[str, str]) -> list[Path]:
    """A run's per-epoch log and config under ``logs/``, relative to the results folder."""
    stem = Path("logs") / row["dataset"] / row["protocol"] / row["variant"] / f"seed{row['seed']}"
    return [stem.with_suffix(".csv"), stem.with_suffix(".yaml")]


def _budget(row: dict[str, str]) -> str:
    return f"epochs {row['epochs']}, budget {row['budget']}"


def _other_budgets(rows: Sequence[dict[str, str]], existing: Sequence[dict[str, str]]) -> list[str]:
    """Rows of a dataset that ``existing`` holds in the same table with another budget (epochs,
    budget): pooled in one report they would read as seeds of one run, and their logs collide."""
    budgets: dict[tuple[str, str], set[str]] = {}
    for row in existing:
        budgets.setdefault((row["table"], row["dataset"]), set()).add(_budget(row))
    problems = []
    for row in rows:
        held = budgets.get((row["table"], row["dataset"]), {_budget(row)})
        if _budget(row) not in held:
            problems.append(f"{row['dataset']} in table {row['table']!r} with {_budget(row)} (it holds "
                            f"{'; '.join(sorted(held))})")
    return list(dict.fromkeys(problems))


def _mixed(rows: Sequence[dict[str, str]], existing: Sequence[dict[str, str]]) -> list[str]:
    """Why rows do not belong with ``existing`` ones: a table they lack, or a dataset they hold
    in that table with another budget (epochs, budget)."""
    tables = sorted({r["table"] for r in existing})
    missing = [f"table {r['table']!r} (it holds {tables})" for r in rows if r["table"] not in tables]
    return list(dict.fromkeys(missing)) + _other_budgets([r for r in rows if r["table"] in tables], existing)


def merge_results(source: Path, keys: set[tuple[str, ...]], target: Path, commands: Sequence[str], *,
                  allow_mixed: bool = False) -> int:
    """Append to ``target`` (a committed results folder) the rows of ``source`` whose key is in
    ``keys``, their logs and the ``commands`` that made them (when it adds any); return how many
    rows were added.

    Append-only: rows already there are kept, never replaced, and a log file that exists is
    never written over. Rows of a table ``target`` does not hold, or of a dataset it holds with
    another budget, are refused unless ``allow_mixed``. Everything is checked before anything
    is written.
    """
    existing, finished = read_rows(target / "runs.csv"), read_rows(source / "runs.csv")
    missing = len(keys - {row_key(r) for r in finished})
    if missing:
        raise ValueError(f"{source}: {missing} planned run(s) have no row; finish the sweep before merging")
    have = {row_key(r) for r in existing}
    rows = [r for r in finished if row_key(r) in keys and row_key(r) not in have]
    counts = Counter(row_key(r) for r in rows)
    twice = sorted(" ".join(key) for key, count in counts.items() if count > 1)
    if twice:
        raise ValueError(f"{source}/runs.csv holds two rows of {twice[0]}: two sweeps ran it at once? "
                         "Keep one row before merging")
    problems = [] if allow_mixed or not existing else _mixed(rows, existing)
    if problems:
        raise ValueError(f"--merge-into {target}: rows of another table or budget: {'; '.join(problems)}; "
                         "pass --allow-mixed to add them anyway")
    clashes = [str(target / f) for r in rows for f in _log_files(r) if (target / f).exists()
               and not ((source / f).is_file() and filecmp.cmp(source / f, target / f, shallow=False))]
    if clashes:
        raise ValueError(f"--merge-into {target}: {clashes[0]} exists (a run of another budget); "
                         "merge into another folder")
    for row in rows:
        for name in _log_files(row):
            if (source / name).is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / name, target / name)
    if rows:  # a command is recorded beside the rows it made, not for a merge that added none
        _append_rows(target / "runs.csv", rows)
        record_commands(target, commands)
    return len(rows)


def changed_finished_runs(runs: Sequence[tuple[str, TrainConfig]], results_dir: Path) -> list[str]:
    """``dataset variant seed: changes`` for each planned run that ``results_dir`` holds finished
    with other result-changing options (its config copy under ``logs/``), e.g. another ``--set``."""
    from primal_dual_attention.training.engine import changed_options

    finished = finished_runs(results_dir / "runs.csv")
    changed = []
    for table, cfg in runs:
        if run_key(table, cfg) not in finished:
            continue
        row = {"dataset": cfg.dataset, "protocol": cfg.protocol, "variant": cfg.variant,
               "seed": str(cfg.seed)}
        saved_config = results_dir / _log_files(row)[1]
        if saved_config.is_file():
            changes = changed_options(yaml.safe_load(saved_config.read_text()) or {}, cfg)
            if changes:
                changed.append(f"{cfg.dataset} {cfg.variant} seed {cfg.seed}: {changes}")
    return changed


def _run_one(table: str, cfg: TrainConfig, results_dir: Path, machine: str) -> dict:
    import torch

    from primal_dual_attention.training.engine import fit, seed_everything
    from primal_dual_attention.training.tasks import build_task

    seed_everything(cfg.seed)
    result = fit(cfg, build_task(cfg))
    log_copy = (results_dir / "logs" / cfg.dataset / cfg.protocol / cfg.variant
                / f"seed{cfg.seed}.csv")
    log_copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(result.run_dir) / "log.csv", log_copy)
    shutil.copyfile(Path(result.run_dir) / "config.yaml", log_copy.with_suffix(".yaml"))
    return {
        "table": table, "dataset": cfg.dataset, "protocol": cfg.protocol, "variant": cfg.variant,
        "seed": cfg.seed, "epochs": cfg.epochs, "budget": f"{cfg.budget:g}",
        "test_acc": f"{result.test_accuracy:.6f}",
        "best_epoch": result.best_epoch, "params": result.params,
        "epoch_seconds": f"{result.epoch_seconds:.4f}",
        "train_samples_per_s": f"{result.train_samples_per_second:.1f}",
        "wall_seconds": f"{result.wall_seconds:.1f}", "threads": torch.get_num_threads(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine,
    }


def _worker(runs: list[tuple[str, TrainConfig]], results_dir: Path, threads: int, machine: str,
            log) -> None:
    import torch

    torch.set_num_threads(threads)
    results_csv = results_dir / "runs.csv"
    for table, cfg in runs:
        if run_key(table, cfg) in finished_runs(results_csv):
            continue
        start = time.perf_counter()
        try:
            row = _run_one(table, cfg, results_dir, machine)
        except BaseException:  # say which run stopped the sweep; rerunning continues from it
            log(f"{cfg.dataset} {cfg.protocol} {cfg.variant} seed {cfg.seed} failed ({cfg.run_dir()})")
            raise
        _append_rows(results_csv, [row])
        log(f"{cfg.dataset:>26} {cfg.protocol:5} {cfg.variant:12} seed {cfg.seed}: "
            f"acc {float(row['test_acc']):.4f} ({time.perf_counter() - start:.0f} s)")


def _worker_process(runs: list[tuple[str, TrainConfig]], results_dir: Path, threads: int,
                    machine: str) -> None:
    """A worker process: a bad input or a diverged run ends it with ``pda``'s one-line error
    (exit status 2), anything else with its traceback."""
    try:
        _worker(runs, results_dir, threads, machine, print)
    except (ValueError, OSError, FloatingPointError) as error:
        print(f"pda: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def run_sweep(runs: list[tuple[str, TrainConfig]], results_dir: str | Path, workers: int = 1,
              threads_per_worker: int = 1, log=print) -> None:
    """Run every unfinished run; ``workers`` processes share the list round-robin. Each row
    records the machine it ran on (with the workers and threads), for the reports."""
    results_dir = Path(results_dir)
    planned = [{"table": t, "dataset": c.dataset, "epochs": str(c.epochs), "budget": f"{c.budget:g}"}
               for t, c in runs]
    problems = _other_budgets(planned, read_rows(results_dir / "runs.csv"))
    if problems:
        raise ValueError(f"--out {results_dir}: it holds runs of another budget: {'; '.join(problems)}; "
                         "give this sweep its own --out folder")
    changed = changed_finished_runs(runs, results_dir)
    if changed:
        raise ValueError(f"--out {results_dir}: its finished runs were made with other options "
                         f"({'; '.join(changed[:3])}{'; ...' if len(changed) > 3 else ''}), so this "
                         "command would be recorded beside rows it did not make; give it its own --out "
                         "folder")
    results_dir.mkdir(parents=True, exist_ok=True)
    machine = f"{machine_description()}; {workers} worker(s) x {threads_per_worker} thread(s)"
    todo = [(t, c) for t, c in runs if run_key(t, c) not in finished_runs(results_dir / "runs.csv")]
    log(f"{len(runs)} runs planned, {len(runs) - len(todo)} already finished, {len(todo)} to run "
        f"with {workers} worker(s)")
    if workers <= 1:
        _worker(todo, results_dir, threads_per_worker, machine, log)
        return
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker_process, args=(todo[i::workers], results_dir,
                                                                 threads_per_worker, machine))
                 for i in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failed = [p.exitcode for p in processes if p.exitcode]
    if failed:
        raise ChildProcessError(f"{len(failed)} sweep worker(s) failed (exit codes {failed}); "
                                "rerun the same command to continue")
