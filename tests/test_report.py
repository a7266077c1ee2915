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
from primal_dual_attention.analysis.uea_report import read_runs, write_uea_report
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
    assert "| bn | 1 | 0.400 | 0.200 | 0.000 | less |" in report  # js higher, cos_maps lower than softmax
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
    assert {r["ratio_to_sdpa"] for r in rows if r["variant"] == "sdpa"} == {"1.000"}
    md = md_path.read_text()
    assert "| sh | " in md and "| sh+pad | " in md
    assert "Targets at N=2048: not measured" in md  # an empty table would read as checked


def test_scaling_benchmark_at_toy_size(tmp_path):
    points = run_scaling(sizes=(64, 128), variants=("softmax", "linear"), batch=1, heads=2, head_dim=4,
                         repeats=1, memory=False, progress=lambda _: None)
    assert len(points) == 4 and all(p.gflops > 0 for p in points)
    assert growth_exponent(points, "softmax") is None  # needs two points with N >= 1024
    path = write_scaling(points, tmp_path, "test", 1, 2, 4)
    assert (tmp_path / "scaling.png").is_file()
    assert "SH scales (1, 2)" in path.read_text()  # the scales of the 2 heads measured


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


def _write_runs(path: Path, rows: list[dict]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "runs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RUN_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({"table": "main", "protocol": "clean", "epochs": 5, "budget": 1, "best_epoch": 3,
                             "params": 100, "epoch_seconds": 0.1, "train_samples_per_s": 10,
                             "wall_seconds": 1.0, "threads": 1, "finished_at": "now"} | row)


def test_uea_report_of_two_variants_has_no_cd_diagram_and_one_seed_no_spread(tmp_path):
    """aeon's Friedman test needs 3 variants (the report crashed, losing a sweep's merge); a
    single seed prints its mean alone, never '± 0'."""
    rows = [{"dataset": d, "variant": v, "seed": s, "test_acc": 0.5 + 0.1 * i + 0.01 * s}
            for d in "ABC" for i, v in enumerate(("softmax", "bn")) for s in range(3)]
    rows += [{"dataset": "D", "variant": "softmax", "seed": 0, "test_acc": 0.4}]
    _write_runs(tmp_path, rows)
    text = write_uea_report(tmp_path).read_text()
    assert "| bn | 61.00 | 1.00 | 3/0/0 |" in text and not (tmp_path / "main_clean_cd.png").exists()
    assert "| D | **40.0 (n=1)** | – |" in text
    assert "Fewer than 3 seeds for some variant" in text and "D;" in text


def test_runs_of_other_budgets_are_never_pooled_as_seeds(tmp_path):
    """A dataset held at two budgets (--allow-mixed) gives a table per budget in the sweep report
    and a row per budget in the UEA report."""
    from primal_dual_attention.analysis.task_report import _dataset_section

    def row(variant: str, seed: int, budget: str, acc: float) -> dict:
        return {"dataset": "A", "variant": variant, "seed": seed, "budget": budget, "test_acc": acc}

    rows = [row(v, 0, budget, acc + (v == "bn")) for v in ("softmax", "bn")
            for budget, acc in (("0.008", 0.17), ("0.4", 0.37))]
    _write_runs(tmp_path, rows)
    text = write_uea_report(tmp_path).read_text()
    assert "| A (5 epochs, budget 0.008) | 17.0 (n=1) |" in text
    assert "| A (5 epochs, budget 0.4) | 37.0 (n=1) |" in text
    assert "Held at several budgets (`--allow-mixed`), so left out of the statistics below" in text
    section = "\n".join(_dataset_section(tmp_path, "A", read_runs(tmp_path / "runs.csv"), []))
    assert section.count("| softmax | 17.00 (n=1) | 17.00 |") == 1
    assert section.count("| softmax | 37.00 (n=1) | 37.00 |") == 1
    assert section.count("`bn` − `softmax`: +100.00 points") == 2  # each paired within its budget


def test_lm_report_takes_seed_folders_of_one_dataset(tmp_path):
    """seed0-2 is a run of seed 0 with other options, not a fourth seed; runs of two datasets
    would overwrite each other's seeds, so they are refused."""
    from primal_dual_attention.analysis.lm_report import _read, collect

    def run(dataset: str, folder: str, bpb: float) -> None:
        path = tmp_path / "runs" / "lm" / dataset / "clean" / "softmax" / folder
        path.mkdir(parents=True)
        (path / "lm_eval.json").write_text(f'{{"test_bpb": {bpb}}}')
        (path / "log.csv").write_text("epoch,val_loss\n1,2.0\n")

    for seed in (10, 2, 0):
        run("imdb", f"seed{seed}", 2.0 + seed)
    run("imdb", "seed0-2", 1.5)
    said = []
    collect(tmp_path / "runs", tmp_path / "out", log=said.append)
    assert [e["test_bpb"] for e, _ in _read(tmp_path / "out")["softmax"]] == [2.0, 4.0, 12.0]
    assert len(said) == 1 and "seed0-2" in said[0]
    run("tinyshakespeare", "seed1", 3.0)
    with pytest.raises(ValueError, match="datasets \\['imdb', 'tinyshakespeare'\\]"):
        collect(tmp_path / "runs", tmp_path / "out2")


def test_speed_table_says_how_sparse_flops_are_counted(tmp_path):
    costs = [ModelCost("lra", "listops", variant, 4, "2000", 100, 1.0, 3.0, 10.0, 20.0, None, "cpu", "fp32")
             for variant in ("softmax", "sparse")]
    write_costs(costs, tmp_path, "pda bench model")
    assert "`sparse` FLOPs are those of its dense band-masked" in write_speed_table(tmp_path).read_text()
    write_costs(costs[:1], tmp_path / "dense", "pda bench model")
    assert "band-masked" not in write_speed_table(tmp_path / "dense").read_text()


def test_curves_draw_only_the_logs_of_reported_runs(tmp_path):
    """A log whose run has no row (cut between the two writes) is not drawn beside the table."""
    from primal_dual_attention.analysis.task_report import _curves

    folder = tmp_path / "logs" / "A" / "clean" / "softmax"
    folder.mkdir(parents=True)
    for seed in (0, 1):
        (folder / f"seed{seed}.csv").write_text(f"epoch,test_acc\n1,0.{seed + 1}\n")
    (curve,) = _curves(tmp_path, "A", "clean", [{"variant": "softmax", "seed": "0"}])
    assert curve == [{"epoch": "1", "test_acc": "0.1"}]


def test_redundancy_verdicts_say_when_the_seeds_do_not_separate_the_variants():
    from primal_dual_attention.analysis.report import _versus_softmax

    softmax = {"js": [0.10, 0.12, 0.14], "cos_maps": [0.70, 0.72, 0.74]}
    assert _versus_softmax({"js": [0.40, 0.41, 0.42], "cos_maps": [0.20, 0.21, 0.22]}, softmax) == "less"
    assert _versus_softmax({"js": [0.12, 0.13, 0.14], "cos_maps": [0.71, 0.72, 0.73]}, softmax) == (
        "within spread")  # both differences below a seed std (0.02)
    assert _versus_softmax({"js": [0.40], "cos_maps": [0.90]}, softmax) == "mixed"
