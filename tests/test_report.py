"""Reports build from a tiny fake results tree; the benchmarks run at toy sizes."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from primal_dual_attention.analysis.bench import run_attention_benchmark, write_results
from primal_dual_attention.analysis.model_cost import (
    COMMAND_NOTE,
    COST_COLUMNS,
    ModelCost,
    write_costs,
    write_speed_table,
)
from primal_dual_attention.analysis.report import write_report
from primal_dual_attention.analysis.scaling import growth_exponent, run_scaling, write_scaling
from primal_dual_attention.analysis.uea_report import write_uea_report
from primal_dual_attention.training.sweep import RUN_COLUMNS


def fake_results(root: Path) -> None:
    uea = root / "uea"
    uea.mkdir(parents=True)
    with open(uea / "runs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RUN_COLUMNS)
        writer.writeheader()
        for d, dataset in enumerate(["A", "B", "C"]):
            for v, variant in enumerate(["softmax", "bn", "sh"]):
                for seed in range(3):
                    writer.writerow({"table": "main", "dataset": dataset, "protocol": "clean",
                                     "variant": variant, "seed": seed, "epochs": 5,
                                     "test_acc": 0.5 + 0.05 * v + 0.01 * seed + 0.1 * d, "best_epoch": 3,
                                     "params": 100, "epoch_seconds": 0.1 + v, "train_samples_per_s": 10,
                                     "wall_seconds": 1.0, "threads": 1, "finished_at": "now"})
    heads = root / "heads" / "A"
    heads.mkdir(parents=True)
    with open(heads / "redundancy.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["label", "layer", "js", "cos_maps", "cos_out"])
        writer.writeheader()
        writer.writerow({"label": "softmax", "layer": 1, "js": 0.1, "cos_maps": 0.7, "cos_out": 0.1})
        writer.writerow({"label": "bn", "layer": 1, "js": 0.4, "cos_maps": 0.2, "cos_out": 0.0})
    (root / "verify").mkdir()
    (root / "verify" / "verify.md").write_text("| a | 1e-16 | yes |\n\nAll exact statements hold: yes.\n")


def test_reports_build_from_a_fake_results_tree(tmp_path):
    fake_results(tmp_path)
    (tmp_path / "uea" / "sweep_commands.txt").write_text("pda sweep --table main\n")
    uea = write_uea_report(tmp_path / "uea").read_text()
    assert "`pda sweep --table main`" in uea
    assert "| A | 51.0 ± 1.0 | 56.0 ± 1.0 | **61.0 ± 1.0** |" in uea  # seeds 50, 51, 52: sample std 1
    assert "W/T/L vs softmax" in uea and "| sh | 71.00 | 1.00 | 3/0/0 |" in uea
    assert (tmp_path / "uea" / "main_clean_bars.png").is_file()
    assert (tmp_path / "uea" / "main_clean_cd.png").is_file()
    report = write_report(tmp_path).read_text()
    for heading in ("Claim 1", "Claim 2", "Claim 3", "Not run here"):
        assert heading in report
    assert "| bn | 1 | 0.400 | 0.200 | 0.000 |" in report
    assert "all hold: yes" in report
    assert "Not measured yet" in report  # no benchmark results in the fake tree


def test_attention_benchmark_at_toy_size(tmp_path):
    results = run_attention_benchmark(sizes=(32,), variants=("softmax", "sh"), repeats=1,
                                      memory=False, progress=lambda _: None)
    csv_path, md_path = write_results(results, tmp_path, "test")
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    assert {r["variant"] for r in rows} >= {"sdpa", "naive", "softmax", "sh"}
    assert all(float(r["gflops"]) > 0 for r in rows)
    assert "Median time" in md_path.read_text()


def test_scaling_benchmark_at_toy_size(tmp_path):
    points = run_scaling(sizes=(64, 128), variants=("softmax", "linear"), batch=1, heads=2, head_dim=4,
                         repeats=1, memory=False, progress=lambda _: None)
    assert len(points) == 4 and all(p.gflops > 0 for p in points)
    assert growth_exponent(points, "softmax") is None  # needs two points with N >= 1024
    path = write_scaling(points, tmp_path, "test", 1, 2, 4)
    assert (tmp_path / "scaling.png").is_file() and "growth exponent" in path.read_text()


def test_cost_rows_measured_again_replace_the_old_ones_in_place(tmp_path):
    """`pda bench model` into a folder of several tables: a table measured again keeps its
    place, its command its line (so a committed speed table does not reorder or repeat)."""
    def costs(dataset: str, ms: float) -> list[ModelCost]:
        return [ModelCost("uea", dataset, variant, 16, "23x12", 100, 0.02, 0.06, 16e3 / (ms * ratio),
                          1e4 / ms, None, "cpu", "fp32", "eager", ms * ratio, ratio, 1.0)
                for variant, ratio in (("softmax", 1.0), ("sh", 1.1))]

    for dataset, ms in (("A", 10.0), ("B", 20.0), ("A", 12.5)):
        write_costs(costs(dataset, ms), tmp_path, f"pda bench model --dataset {dataset}")
    with open(tmp_path / "cost.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["dataset"], r["variant"], r["train_ms"]) for r in rows] == [
        ("A", "softmax", "12.5"), ("A", "sh", "13.75"), ("B", "softmax", "20"), ("B", "sh", "22")]
    commands = (tmp_path / "cost_commands.txt").read_text().splitlines()
    assert [c.rpartition(COMMAND_NOTE)[0] for c in commands] == ["pda bench model --dataset A",
                                                                 "pda bench model --dataset B"]
    table = write_speed_table(tmp_path).read_text()
    assert table.index("uea A") < table.index("uea B") and "| sh | 13.75 (1.10) |" in table


def test_a_cost_file_of_another_version_is_refused_and_kept(tmp_path):
    old = tmp_path / "cost.csv"
    old.write_text(",".join([*COST_COLUMNS, "retired_column"]) + "\n")
    with pytest.raises(ValueError, match="retired_column"):
        write_costs([], tmp_path, "pda bench model")
    assert "retired_column" in old.read_text()


def test_sweep_report_pairs_seeds_by_number_and_labels_modes(tmp_path):
    """A variant missing a seed is compared with softmax on the seeds both ran, not by position;
    a cost table with eager and compiled rows says which figure is which."""
    from primal_dual_attention.analysis.task_report import _dataset_section

    def row(variant: str, seed: int, acc: float) -> dict:
        return {"variant": variant, "protocol": "clean", "epochs": "1", "seed": str(seed), "test_acc": acc,
                "best_epoch": "1", "params": "10"}

    rows = [row("softmax", 0, 0.5), row("softmax", 1, 0.6), row("softmax", 2, 0.7),
            row("bn", 1, 0.55), row("bn", 2, 0.65)]
    cost = {"dataset": "X", "variant": "bn", "device": "cpu", "precision": "fp32", "batch": "4",
            "gflops_fwd_per_sample": "0.1", "peak_train_mb": "1"}
    costs = [cost | {"mode": "eager", "train_samples_per_s": "100", "infer_samples_per_s": "200"},
             cost | {"mode": "compile", "train_samples_per_s": "300", "infer_samples_per_s": "400"}]
    text = "\n".join(_dataset_section(tmp_path, "X", rows, costs))
    assert "`bn` − `softmax`: -5.00 points (the 2 seeds both ran); higher on 0 of 2 seeds" in text
    assert "100 (cpu fp32, batch 4, eager), 300 (cpu fp32, batch 4, compile)" in text


def test_framework_summary_counts_failing_statements_too(tmp_path):
    from primal_dual_attention.analysis.report import _framework_section

    (tmp_path / "verify").mkdir()
    (tmp_path / "verify" / "verify.md").write_text(
        "| statement | max error | holds |\n|---|---|---|\n| a | 1e-16 | yes |\n| b | 0.5 | **NO** |\n"
        "All exact statements hold: NO.\n")
    assert "2 exact statements checked in float64; all hold: NO" in "\n".join(_framework_section(tmp_path))
