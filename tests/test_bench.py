"""The measuring tools behind the cost claims: what they time is what they label, their ratios
compare rows of one process, and a bad option or output folder fails before any measuring."""

from __future__ import annotations

import csv
from dataclasses import replace

import pytest
import torch

from primal_dual_attention.analysis import model_cost
from primal_dual_attention.analysis.model_cost import ModelCost, write_costs, write_speed_table
from primal_dual_attention.cli import main
from primal_dual_attention.training.config import TrainConfig, bundled_config

FIVE_VARIANTS = ("softmax", "bn", "sh", "bn_sh", "linear")


def tiny_listops(monkeypatch, tmp_path) -> TrainConfig:
    """Generated ListOps of 48 tokens and a one-layer model of width 16."""
    monkeypatch.setenv("PDA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("primal_dual_attention.training.tasks.LRA_GENERATED_SIZES",
                        {"listops": (8, 4, 4), "pathfinder": (8, 4, 4)})
    base = bundled_config("lra", "listops", TrainConfig(task="lra", dataset="listops"))
    return replace(base, max_len=48, dim=16, depth=1, heads=2, mlp_dim=16, dropout=0.0)


def test_every_variant_timed_under_compile_is_compiled(monkeypatch, tmp_path):
    """Five variants' models share one ``forward`` and need a graph each per mode (training,
    inference): ten graphs, past Dynamo's default of 8 versions of a function, beyond which it
    ran the rest eagerly while the rows said compile."""
    from torch._dynamo.utils import counters

    base = replace(tiny_listops(monkeypatch, tmp_path), compile_backend="eager")
    cfgs = model_cost.variant_configs(base, FIVE_VARIANTS)
    counters.clear()
    costs = model_cost.measure_model_costs(cfgs, batch=2, warmup=1, repeats=1, device="cpu",
                                           modes=("compile",), memory=False)
    assert [c.mode for c in costs] == ["compile[eager]"] * 5  # never taken for inductor's rows
    assert counters["stats"]["unique_graphs"] >= 2 * len(FIVE_VARIANTS)


def test_a_window_belongs_to_the_sparse_variants_only(monkeypatch, tmp_path):
    base = replace(tiny_listops(monkeypatch, tmp_path), window=4)
    with pytest.warns(UserWarning, match=r"window=4 is the sparse variants' own: \['softmax'\] run without"):
        cfgs = model_cost.variant_configs(base, ("softmax", "sparse", "sh"))
    assert [c.window for c in cfgs] == [None, 4, None]  # softmax stays dense, SH takes none
    with pytest.raises(ValueError, match="variant 'sparse' needs its window: --set window=w"):
        model_cost.variant_configs(replace(base, window=None), ("softmax", "sparse"))


def cost(variant: str, ms: float, ratio: float | None, shape: str = "23x12") -> ModelCost:
    return ModelCost("uea", "A", variant, 16, shape, 100, 0.02, 0.06, 16e3 / ms, 1e4 / ms, None, "cpu",
                     "fp32", "eager", ms, ratio, 1.0)


def test_speed_table_ratios_come_from_one_process(tmp_path):
    """A variant measured again alone (another process, softmax not beside it) shows its time
    but no ratio: the table never divides rows of two commands."""
    write_costs([cost("softmax", 10.0, 1.0), cost("sh", 11.0, 1.1)], tmp_path, "pda bench model")
    assert "| sh | 11.00 (1.10) |" in write_speed_table(tmp_path).read_text()
    write_costs([cost("sh", 30.0, None)], tmp_path, "pda bench model --variants sh")
    table = write_speed_table(tmp_path).read_text()
    assert "| sh | 30.00 |" in table and "| softmax | 10.00 (1.00) |" in table


def test_cost_rows_of_another_input_shape_are_another_table(tmp_path):
    write_costs([cost("softmax", 10.0, 1.0)], tmp_path, "pda bench model --set max_len=23")
    write_costs([cost("softmax", 50.0, 1.0, shape="2000")], tmp_path, "pda bench model")
    with open(tmp_path / "cost.csv", newline="") as handle:
        assert [r["input_shape"] for r in csv.DictReader(handle)] == ["23x12", "2000"]
    table = write_speed_table(tmp_path).read_text()
    assert "## uea A (23x12)" in table and "## uea A (2000)" in table


def fail_if_called(*_, **__):
    raise AssertionError("measured before the options were checked")


def test_bench_model_checks_its_folder_and_options_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(model_cost, "measure_model_costs", fail_if_called)
    monkeypatch.setattr(model_cost, "prepare_model", fail_if_called)
    (tmp_path / "cost.csv").write_text("task,retired_column\n")
    command = ["bench", "model", "--task", "uea", "--dataset", "JapaneseVowels", "--variants", "softmax"]
    assert main([*command, "--out", str(tmp_path)]) == 2
    assert "retired_column" in capsys.readouterr().err
    for option, hint in (("compile=on", "--modes"), ("device=cpu", "--device")):
        assert main([*command, "--set", option, "--out", str(tmp_path / "new")]) == 2
        assert hint in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*command, "--device", "foo"])
    assert "device must be auto, cpu, cuda" in capsys.readouterr().err


def test_bench_model_refuses_cudagraphs_without_cuda_and_unknown_backends(monkeypatch, tmp_path):
    monkeypatch.setattr(model_cost, "prepare_model", fail_if_called)
    cfgs = model_cost.variant_configs(tiny_listops(monkeypatch, tmp_path), ("softmax",))
    with pytest.raises(ValueError, match="cudagraphs needs a CUDA device, got device 'cpu'"):
        model_cost.measure_model_costs(cfgs, batch=2, device="cpu", modes=("cudagraphs",))
    unknown = [replace(cfgs[0], compile_backend="foo")]  # failed in Dynamo after the eager rows
    with pytest.raises(ValueError, match="compile_backend must be one of .*got 'foo'"):
        model_cost.measure_model_costs(unknown, batch=2, device="cpu", modes=("eager", "compile"))


@pytest.mark.parametrize("kind", ["attention", "scaling"])
def test_a_layer_bench_checks_its_output_folder_before_measuring(tmp_path, monkeypatch, capsys, kind):
    monkeypatch.setattr("primal_dual_attention.analysis.bench.time_cases", fail_if_called)
    monkeypatch.setattr("primal_dual_attention.analysis.scaling.time_cases", fail_if_called)
    (tmp_path / "a_file").write_text("")
    assert main(["bench", kind, "--sizes", "16", "--variants", "softmax", "--repeats", "1", "--no-memory",
                 "--out", str(tmp_path / "a_file")]) == 2
    assert "File exists" in capsys.readouterr().err


def test_a_crash_at_a_large_size_keeps_the_smaller_sizes_written(tmp_path, monkeypatch):
    from primal_dual_attention.analysis import bench

    time_cases = bench.time_cases

    def out_of_memory_at_64(cases, repeats, **kwargs):
        if cases[0].num_tokens == 64:
            raise RuntimeError("out of memory")
        return time_cases(cases, repeats, **kwargs)

    monkeypatch.setattr(bench, "time_cases", out_of_memory_at_64)
    with pytest.raises(RuntimeError, match="out of memory"):
        main(["bench", "attention", "--sizes", "16,64", "--variants", "softmax", "--repeats", "1",
              "--no-memory", "--out", str(tmp_path)])
    with open(tmp_path / "attention.csv", newline="") as handle:
        assert {r["num_tokens"] for r in csv.DictReader(handle)} == {"16"}
    assert "**Partial:**" in (tmp_path / "attention.md").read_text()  # not taken for a whole table


def test_precision_check_sees_non_finite_gradients(monkeypatch):
    """The check's verdict covers the backward pass: a layer whose gradients overflow fails it."""
    from primal_dual_attention.analysis import precision

    rows = precision.precision_check("cpu", ("fp32", "bf16"), batch=2, num_tokens=12, dim=8, heads=2,
                                     repeats=1, log=lambda _: None)
    assert len(rows) == 2 * len(precision.VARIANTS) and all(r["finite"] for r in rows)

    class InfGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    forward = precision.MultiHeadAttention.forward
    monkeypatch.setattr(precision.MultiHeadAttention, "forward",
                        lambda self, x, **kw: forward(self, InfGradient.apply(x), **kw))
    monkeypatch.setattr(precision, "VARIANTS", {"softmax": precision.VARIANTS["softmax"]})
    rows = precision.precision_check("cpu", ("fp32",), batch=2, num_tokens=12, dim=8, heads=2, repeats=1,
                                     log=lambda _: None)
    assert [r["finite"] for r in rows] == [False]
