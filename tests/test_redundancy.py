"""Head-redundancy metrics on hand-made maps with known answers (SPEC.md §3)."""

from __future__ import annotations

import math

import pytest
import torch

from primal_dual_attention import MultiHeadAttention
from primal_dual_attention.analysis.redundancy import (
    capture_heads,
    js_divergence,
    model_redundancy,
    redundancy,
)


def test_identical_heads_have_zero_js_and_unit_cosine():
    maps = torch.softmax(torch.randn(2, 1, 5, 5), -1).expand(2, 3, 5, 5)
    outputs = torch.randn(2, 1, 5, 4).expand(2, 3, 5, 4)
    metrics = redundancy(maps, outputs)
    torch.testing.assert_close(metrics["js"], torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(metrics["cos_maps"], torch.ones(2))
    torch.testing.assert_close(metrics["cos_out"], torch.ones(2))


def test_disjoint_one_hot_heads_have_js_ln2_and_zero_cosine():
    eye = torch.eye(4)
    maps = torch.stack([eye, eye.roll(1, dims=1)])[None]  # two heads, each row one-hot, disjoint
    outputs = torch.stack([torch.tensor([[1.0, 0.0]] * 4), torch.tensor([[0.0, 1.0]] * 4)])[None]
    metrics = redundancy(maps, outputs)
    torch.testing.assert_close(metrics["js"], torch.tensor([math.log(2)]))
    torch.testing.assert_close(metrics["cos_maps"], torch.zeros(1))
    torch.testing.assert_close(metrics["cos_out"], torch.zeros(1))


def test_js_is_symmetric_and_bounded():
    p, q = torch.softmax(torch.randn(10, 7), -1), torch.softmax(torch.randn(10, 7), -1)
    torch.testing.assert_close(js_divergence(p, q), js_divergence(q, p))
    assert ((js_divergence(p, q) >= 0) & (js_divergence(p, q) <= math.log(2) + 1e-6)).all()


def test_padded_queries_do_not_count():
    maps = torch.softmax(torch.randn(1, 2, 6, 6), -1)
    outputs = torch.randn(1, 2, 6, 3)
    mask = torch.tensor([[False] * 4 + [True] * 2])
    base = redundancy(maps, outputs, mask)
    maps2, outputs2 = maps.clone(), outputs.clone()
    maps2[:, :, 4:] = torch.softmax(torch.randn(1, 2, 2, 6), -1)
    outputs2[:, :, 4:] = 99.0
    changed = redundancy(maps2, outputs2, mask)
    for name in base:
        torch.testing.assert_close(base[name], changed[name])


def test_capture_heads_spreads_pooled_maps_and_rows_sum_to_one():
    layer = MultiHeadAttention(16, 4, variant="bn_sh").eval()
    x = torch.randn(2, 11, 16)
    mask = torch.arange(11)[None] >= torch.tensor([11, 7])[:, None]
    (capture,) = capture_heads(layer, x, key_padding_mask=mask)
    assert capture.maps.shape == (2, 4, 11, 11)
    torch.testing.assert_close(capture.maps.sum(-1), torch.ones(2, 4, 11))
    assert (capture.maps[1, :, :, 7:] == 0).all()


def test_what_padded_tokens_hold_changes_no_metric():
    """NaN at padded positions (as padded series may hold) leaves every metric as zeros there do:
    the head outputs use the layer's zeroed values."""
    torch.manual_seed(0)
    layer = MultiHeadAttention(8, 2, variant="sh").eval()
    x = torch.randn(2, 6, 8)
    mask = torch.arange(6)[None] >= torch.tensor([6, 3])[:, None]
    zeros, nans = x.masked_fill(mask[..., None], 0.0), x.masked_fill(mask[..., None], float("nan"))
    base = model_redundancy(layer, [(zeros, mask, None)])
    assert model_redundancy(layer, [(nans, mask, None)]) == base and all(map(math.isfinite, base[1].values()))


def test_an_all_padding_sample_does_not_count():
    torch.manual_seed(0)
    layer = MultiHeadAttention(8, 2).eval()
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[False] * 5, [True] * 5])
    alone = model_redundancy(layer, [(x[:1], mask[:1], None)])
    with_empty = model_redundancy(layer, [(x, mask, None)])
    for name, value in alone[1].items():
        assert math.isclose(with_empty[1][name], value, rel_tol=1e-6), name


def test_maps_are_captured_without_dropout_whatever_the_mode():
    torch.manual_seed(0)
    layer = MultiHeadAttention(8, 2, variant="bn_sh", attn_drop=0.5)
    x = torch.randn(2, 6, 8)
    (training,) = capture_heads(layer.train(), x)
    assert layer.training  # the mode is given back
    (evaluation,) = capture_heads(layer.eval(), x)
    torch.testing.assert_close(training.maps, evaluation.maps)


def test_pda_heads_compares_checkpoints(tmp_path):
    from dataclasses import replace

    from primal_dual_attention.cli import main
    from primal_dual_attention.training.config import TrainConfig
    from primal_dual_attention.training.engine import fit, seed_everything
    from primal_dual_attention.training.tasks import build_task

    checkpoints = []
    for variant in ("softmax", "bn_sh"):
        cfg = replace(TrainConfig(), variant=variant, dim=16, depth=2, heads=4, mlp_dim=16, epochs=1,
                      out_dir=str(tmp_path / "runs"), progress=False)
        seed_everything(0)
        fit(cfg, build_task(cfg))
        checkpoints.append(str(cfg.run_dir() / "best.pt"))
    out = tmp_path / "heads"
    assert main(["heads", *checkpoints, "--samples", "100000", "--out", str(out)]) == 0
    rows = (out / "redundancy.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2  # header + 2 checkpoints x 2 layers
    assert all((out / name).is_file() for name in ("redundancy.png", "maps.png", "README.md"))
    readme = (out / "README.md").read_text()
    assert "one row per variant" in readme
    assert "over the first 370 test series" in readme  # the split's size, not the --samples asked


@pytest.mark.parametrize("change, message", [
    ({}, "both softmax seed 0"),  # the same run twice is not two seeds
    ({"seed": 1, "dataset": "Handwriting"}, "one dataset"),
    ({"seed": 1, "attention_options": {"eps": 1e-3}}, "other attention"),
])
def test_pda_heads_refuses_checkpoints_that_are_not_seeds_of_one_set_up(tmp_path, capsys, change, message):
    """A variant's checkpoints are averaged as seeds: the same run twice, another dataset or other
    attention options are refused, before any data loads (the second is never read)."""
    from dataclasses import replace

    from primal_dual_attention.cli import main
    from primal_dual_attention.training.config import TrainConfig
    from primal_dual_attention.training.engine import fit, seed_everything
    from primal_dual_attention.training.tasks import build_task

    cfg = replace(TrainConfig(), dim=8, depth=1, heads=2, mlp_dim=8, epochs=1, out_dir=str(tmp_path),
                  progress=False)
    seed_everything(0)
    fit(cfg, build_task(cfg))
    first = str(cfg.run_dir() / "best.pt")
    state = torch.load(first, weights_only=False)
    state["config"] |= change
    second = tmp_path / "second.pt"
    torch.save(state, second)
    assert main(["heads", first, str(second), "--samples", "4", "--out", str(tmp_path / "heads")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "heads").exists()
    from primal_dual_attention.analysis.redundancy import _checkpoint_configs

    state["config"] = torch.load(first, weights_only=False)["config"] | {"seed": 1}
    torch.save(state, second)  # seed 1 of the same set-up: two seeds, accepted
    assert [cfg.seed for cfg, _ in _checkpoint_configs([first, str(second)], None)] == [0, 1]
    with pytest.raises(ValueError, match="both softmax seed 0"):
        _checkpoint_configs([first, str(second), first], None)  # one checkpoint given twice


def test_a_layer_run_on_both_documents_is_one_layer_counting_each_non_empty_document():
    """LRA Retrieval encodes each document of a pair with the same layers: each layer is one
    row whose mean is over the documents that have a token (an empty one added a 0 before)."""
    from primal_dual_attention.models.lra import LRAClassifier

    model = LRAClassifier(20, 2, 8, dim=8, depth=2, num_heads=2, dropout=0.0, dual=True)
    tokens = torch.randint(1, 20, (3, 16))
    lengths = torch.tensor([[8, 8], [0, 6], [5, 0]])  # per pair: first and second document
    mask = torch.cat([torch.arange(8)[None] >= lengths[:, :1], torch.arange(8)[None] >= lengths[:, 1:]], 1)
    layers = model_redundancy(model, [(tokens, mask, None)])
    assert list(layers) == [1, 2]
    captures = capture_heads(model, tokens, mask)
    for number, metrics in enumerate(layers.values()):
        per_document = []
        for capture in (c for c in captures if c.layer == number):
            values = redundancy(capture.maps, capture.outputs, capture.key_padding_mask)["js"]
            per_document += values[~capture.key_padding_mask.all(1)].tolist()
        assert len(per_document) == 4 and metrics["js"] == pytest.approx(sum(per_document) / 4)


def test_float16_maps_give_finite_metrics():
    """A weight of 2^-24 beside 0: in float16 the pair's mean and logs underflowed to a JS of inf."""
    maps = torch.tensor([[1 - 2**-24, 2**-24], [1.0, 0.0]])[None, :, None].expand(1, 2, 2, 2)
    outputs = torch.randn(1, 2, 2, 3)
    half = redundancy(maps.half(), outputs.half())
    exact = redundancy(maps.double(), outputs.double())
    assert torch.isfinite(half["js"]).all()
    torch.testing.assert_close(half["js"].double(), exact["js"], atol=1e-6, rtol=0)


def test_model_redundancy_gives_the_mode_back():
    layer = MultiHeadAttention(8, 2, attn_drop=0.1).train()
    model_redundancy(layer, [(torch.randn(1, 4, 8), None, None)])
    assert layer.training


def test_a_layer_the_model_never_runs_is_left_out():
    class OneUsed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused, self.used = MultiHeadAttention(8, 2), MultiHeadAttention(8, 2)

        def forward(self, x, mask=None):
            return self.used(x, key_padding_mask=mask)

    layers = model_redundancy(OneUsed(), [(torch.randn(2, 5, 8), None, None)])
    assert list(layers) == [2] and all(map(math.isfinite, layers[2].values()))
