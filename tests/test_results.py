"""Results are append-only and provenance-true (issue 15): a sweep writes only its own folder,
merging into a results folder is explicit and refuses rows of another table or budget, only
finished commands are recorded, and every committed report regenerates byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_reliability import one_line_error
from test_uea import toy_dataset

from primal_dual_attention.cli import main
from primal_dual_attention.training.sweep import read_rows

RESULTS = Path(__file__).parents[1] / "results"
#: every results folder with a report built from its runs.csv, and the sweep task that builds it
REPORTS = {"uea": "uea", "cifar10": "image", "lra": "lra", "lra/history_issue8": "lra", "lra_gpu": "lra",
           "lra_gpu/history_budget_0.0135": "lra", "lra/listops_5000_steps": "lra",
           "lra/listops_5000_steps_lr5e-4": "lra"}


def test_every_committed_report_regenerates_byte_for_byte(tmp_path):
    """From the committed files alone, on any machine: the machines come from the rows."""
    reported = {str(p.parent.relative_to(RESULTS)) for p in RESULTS.glob("**/runs.csv")
                if (p.parent / "README.md").is_file()}
    assert reported == set(REPORTS), "a committed report this test does not regenerate"
    copy = tmp_path / "results"
    shutil.copytree(RESULTS, copy)
    for folder, task in REPORTS.items():
        assert main(["sweep", "--task", task, "--report-only", "--results", str(copy / folder)]) == 0
        regenerated = (copy / folder / "README.md").read_bytes()
        assert regenerated == (RESULTS / folder / "README.md").read_bytes(), folder
    assert main(["report", "--results", str(copy)]) == 0
    assert (copy / "README.md").read_bytes() == (RESULTS / "README.md").read_bytes()


def _sweep(data: Path, *extra: str) -> list[str]:
    return ["sweep", "--data-dir", str(data), "--datasets", "Toy", "--variants", "softmax", "--protocols",
            "clean", "--seeds", "0", "--epochs", "1", "--set", "dim=8", "--set", "heads=2", "--set",
            "mlp_dim=8", "--set", "depth=1", "--set", "batch_size=2", "--set", "threads=1", *extra]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_sweep_writes_its_own_folder_and_merges_only_when_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = toy_dataset(tmp_path / "data" / "Toy").parent
    own, results = tmp_path / "runs" / "sweep" / "uea", tmp_path / "kept"
    assert main(_sweep(data)) == 0
    assert not (tmp_path / "results").exists()  # nothing committed is touched
    (row,) = read_rows(own / "runs.csv")
    assert (row["epochs"], row["budget"]) == ("1", "1") and "logical cores" in row["machine"]
    assert len((own / "sweep_commands.txt").read_text().splitlines()) == 1

    assert main(_sweep(data, "--merge-into", str(results))) == 0  # the finished run is merged
    assert [r["test_acc"] for r in read_rows(results / "runs.csv")] == [row["test_acc"]]
    assert (results / "logs" / "Toy" / "clean" / "softmax" / "seed0.csv").is_file()
    assert "--merge-into" in (results / "sweep_commands.txt").read_text()
    kept = _snapshot(results)

    # the same runs with other options are not "already finished": refused, nothing recorded
    recorded = (own / "sweep_commands.txt").read_text()
    err = one_line_error(capsys, _sweep(data, "--table", "extended", "--protocols", "paper"))
    assert "this sweep plans no run" in err
    err = one_line_error(capsys, _sweep(data, "--dataset-epochs", "Tooy=3"))
    assert "--dataset-epochs names ['Tooy'], which this sweep does not run" in err
    from primal_dual_attention.training.sweep import plan_runs

    (run,) = plan_runs("lra", "lra-listops", ["lra-listops"], protocols=("clean",), seeds=(0,),
                       variants=("softmax",), epochs=2, epochs_per_dataset={"listops": 5})
    assert run[1].epochs == 5  # the task's own name for its dataset counts too
    err = one_line_error(capsys, [*_sweep(data), "--set", "dim=16"])
    assert "its finished runs were made with other options (Toy softmax seed 0: dim: 8 -> 16)" in err
    assert (own / "sweep_commands.txt").read_text() == recorded
    other = tmp_path / "runs" / "other"  # merged, its row would be dropped beside the kept one's
    err = one_line_error(capsys, [*_sweep(data, "--out", str(other), "--merge-into", str(results)),
                                  "--set", "dim=16"])
    assert f"--merge-into {results}: it holds these runs made with other options (Toy softmax seed 0: " \
           "dim: 8 -> 16)" in err
    assert not other.exists()  # refused before any training

    # a sweep's own folder holds one budget per dataset: it is refused before anything runs
    err = one_line_error(capsys, _sweep(data, "--epochs", "2"))
    assert "--out runs/sweep/uea: it holds runs of another budget: Toy in table 'main' with epochs 2, " \
           "budget 1 (it holds epochs 1, budget 1); give this sweep its own --out folder" in err
    assert len(read_rows(own / "runs.csv")) == 1
    two = ("--epochs", "2", "--out", str(tmp_path / "runs" / "two"))
    err = one_line_error(capsys, _sweep(data, *two, "--merge-into", str(results)))
    assert "rows of another table or budget: Toy in table 'main' with epochs 2, budget 1 (it holds " \
           "epochs 1, budget 1); pass --allow-mixed" in err
    err = one_line_error(capsys, _sweep(data, "--table", "extended", "--merge-into", str(results)))
    assert "table 'extended' (it holds ['main'])" in err
    err = one_line_error(capsys, _sweep(data, *two, "--merge-into", str(results), "--allow-mixed"))
    assert "seed0.csv exists (a run of another budget)" in err
    assert _snapshot(results) == kept  # refused merges write nothing
    assert len(read_rows(own / "runs.csv")) == 2  # the sweeps themselves ran, in their own folders

    commands = (own / "sweep_commands.txt").read_text()
    one_line_error(capsys, _sweep(data, "--datasets", "Nope"))
    assert (own / "sweep_commands.txt").read_text() == commands  # a failed sweep is not recorded
    err = one_line_error(capsys, _sweep(data, "--results", str(results)))
    assert "--merge-into" in err


def test_a_merge_cut_after_its_logs_completes_and_duplicate_rows_are_refused(tmp_path):
    """A merge killed between copying the logs and appending the rows is completed by the retry
    (the logs are the same bytes); a source with two rows of one run (two sweeps at once) is refused."""
    from primal_dual_attention.training.sweep import RUN_COLUMNS, _append_rows, merge_results, row_key

    def row(seed: int) -> dict:
        return dict.fromkeys(RUN_COLUMNS, "1") | {"table": "main", "dataset": "Toy", "protocol": "clean",
                                                  "variant": "softmax", "seed": str(seed), "test_acc": "0.5"}

    source, target = tmp_path / "source", tmp_path / "target"
    _append_rows(source / "runs.csv", [row(0), row(1)])
    _append_rows(target / "runs.csv", [row(0)])
    for folder in (source, target):  # seed 1's logs were copied, its row not appended
        (folder / "logs" / "Toy" / "clean" / "softmax").mkdir(parents=True, exist_ok=True)
        (folder / "logs" / "Toy" / "clean" / "softmax" / "seed1.csv").write_text("epoch\n1\n")
    assert merge_results(source, {row_key(row(0)), row_key(row(1))}, target, ["pda sweep"]) == 1
    assert merge_results(source, {row_key(row(1))}, target, ["pda sweep --set other=1"]) == 0
    assert (target / "sweep_commands.txt").read_text() == "pda sweep\n"  # not beside rows it did not add
    _append_rows(source / "runs.csv", [row(2), row(2)])
    with pytest.raises(ValueError, match="holds two rows of main Toy clean softmax 2"):
        merge_results(source, {row_key(row(2))}, target, ["pda sweep"])


def test_failing_sweep_workers_end_with_one_line_each(tmp_path, monkeypatch, capfd):
    """With --workers 2 a run's bad data stops its worker with pda's one-line error, and the
    sweep with one more line (each printed a traceback, the sweep another)."""
    from test_uea import write_ts

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "data" / "Toy"
    folder.mkdir(parents=True)
    write_ts(folder / "Toy_TRAIN.ts", ["1,2,3:4,5,6:a", "2,3,4:5,6,7:a"])  # one class: refused on load
    write_ts(folder / "Toy_TEST.ts", ["1,2,3:4,5,6:a"])
    assert main([*_sweep(folder.parent, "--workers", "2"), "--variants", "softmax,bn"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.count("pda: error:") == 3, err
    assert "single class" in err and "2 sweep worker(s) failed" in err
