"""The primal side: feature maps, primal layers, SVR expansions and fits (SPEC.md §1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from primal_dual_attention.analysis.verify import (
    exact_statements,
    first_head_fit,
    random_qkv,
    real_data_statements,
)
from primal_dual_attention.attention import MultiHeadAttention
from primal_dual_attention.functional import attention
from primal_dual_attention.primal import (
    EluFeatureMap,
    PositiveRandomFeatures,
    PrimalLayer,
    TaylorFeatures,
    dual_to_primal,
    fit_svr,
    kernel_matrix,
    smallest_feasible_c,
    sparse_primal_weights,
    svr_expansion,
    training_set,
)

STATEMENTS = exact_statements()


@pytest.mark.parametrize("statement", STATEMENTS, ids=[s.name[:60] for s in STATEMENTS])
def test_every_exact_statement_of_verify_holds(statement):
    assert statement.error <= statement.tolerance, statement


def test_random_features_error_shrinks_like_inverse_sqrt_m():
    x = torch.randn(6, 4, dtype=torch.float64) * 0.5
    y = torch.randn(6, 4, dtype=torch.float64) * 0.5
    exact = kernel_matrix(x, y, "softmax")

    def mse(m: int) -> float:
        errors = []
        for seed in range(30):
            phi = PositiveRandomFeatures(4, m, seed=seed)
            errors.append(((phi(x) @ phi(y).T - exact) ** 2).mean().item())
        return float(np.mean(errors))

    small, large = mse(32), mse(2048)
    # variance ~ 1/m: 64x more features, about 64x smaller mean squared error
    assert large < small / 16
    assert large < 3 * small / 64


def test_taylor_features_converge_with_order():
    x, y = torch.randn(5, 3, dtype=torch.float64) * 0.5, torch.randn(5, 3, dtype=torch.float64) * 0.5
    exact = kernel_matrix(x, y, "softmax")
    errors = [(TaylorFeatures(3, p)(x) @ TaylorFeatures(3, p)(y).T - exact).abs().max().item()
              for p in (0, 2, 6)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4


def test_primal_layer_is_a_module_with_weights_and_bias():
    q, k, v, mask = random_qkv()
    layer = dual_to_primal(k, v, EluFeatureMap(), key_padding_mask=mask, kernel="linear")
    assert layer.weight.shape == (2, 4, 8, 8) and layer.bias.shape == (2, 4, 8)
    out = layer(q)
    out.sum().backward()
    assert layer.weight.grad is not None
    torch.testing.assert_close(out.detach(), attention(q, k, v, kernel="linear", key_padding_mask=mask))


def test_expansion_with_no_training_pair_is_zero_not_nan():
    q, k, v, _ = random_qkv(n=5)
    visible = torch.zeros(5, 5, dtype=torch.bool)
    visible[1:, :] = True
    out = svr_expansion(q[0, 0], k[0, 0], v[0, 0], "softmax", visible)
    assert torch.isfinite(out).all() and (out[0] == 0).all()


def test_svr_with_zero_epsilon_and_large_c_interpolates_its_training_pairs():
    torch.manual_seed(0)
    keys, values = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    fit = fit_svr(keys, values, "softmax", C=1e6, epsilon=0.0)
    torch.testing.assert_close(fit.predict(keys), values, atol=5e-3, rtol=0)


def test_svr_with_a_wide_tube_has_no_support_vectors():
    keys = torch.randn(6, 2, dtype=torch.float64)
    values = torch.tensor([[0.0], [1.0], [0.5], [0.2], [0.8], [0.4]], dtype=torch.float64)
    fit = fit_svr(keys, values, "linear", C=1.0, epsilon=1.0)  # every target fits in the tube
    assert fit.num_support_vectors == 0
    prediction = fit.predict(keys)
    assert ((prediction >= 0) & (prediction <= 1)).all()


def test_svr_dual_coefficients_respect_the_box():
    keys, values = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    fit = fit_svr(keys, values, "softmax", C=0.05, epsilon=0.0)
    assert np.abs(fit.dual_coef[0]).max() <= 0.05 + 1e-12


def test_smallest_feasible_c_is_the_largest_attention_coefficient():
    keys, values = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    h = kernel_matrix(keys, keys, "softmax").sum(-1, keepdim=True)
    assert smallest_feasible_c(keys, values, "softmax") == pytest.approx((h * values).abs().max().item())


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda k, v: fit_svr(k, v, C=0.0), "C must be > 0"),
        (lambda k, v: fit_svr(k, v, epsilon=-1.0), "epsilon must be >= 0"),
        (lambda k, v: fit_svr(k, v[:3]), "pair up"),
        (lambda k, v: fit_svr(k * float("nan"), v), "NaN or inf"),
        (lambda k, v: dual_to_primal(k, v, EluFeatureMap(), kernel="softmax"), "computes the 'linear'"),
        (lambda k, v: dual_to_primal(k, v, PositiveRandomFeatures(5, 8)), "built for D=5"),
        (lambda k, v: dual_to_primal(k, v, EluFeatureMap(), bn=True, eps=0.0), "eps must be a finite"),
        (lambda k, v: training_set(k, v, bn=True, eps=-1e-5), "eps must be a finite number > 0"),
        (lambda k, v: sparse_primal_weights(k, v, EluFeatureMap(), window=-1), "window must be"),
        (lambda k, v: TaylorFeatures(2, order=3), "order must be an even integer >= 0"),
        (lambda k, v: PositiveRandomFeatures(2, 0), "num_features must be a positive integer, got 0"),
        (lambda k, v: PositiveRandomFeatures(2, 2.5), "num_features must be an integer, got float"),
        (lambda k, v: training_set(k[None], v[None], key_padding_mask=torch.zeros(1, 4)), "dtype torch.bool"),
    ],
)
def test_bad_input(call, match):
    keys, values = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    with pytest.raises((ValueError, TypeError), match=match):
        call(keys, values)


def test_primal_layer_of_one_key_returns_its_value():
    """The linear primal f(x) = W Phi(x) / h(x) of one key is that key's value for every query,
    as the attention it reproduces, even where every feature of a query is far below 0."""
    from primal_dual_attention.primal import EluFeatureMap, dual_to_primal

    keys, values = torch.zeros(1, 3), torch.tensor([[1.5, -2.0]])
    layer = dual_to_primal(keys, values, EluFeatureMap())
    queries = torch.full((2, 3), -200.0)
    torch.testing.assert_close(layer(queries), values.expand(2, -1))


def test_linear_expansion_of_a_query_whose_features_all_underflow():
    """Linear-BN over one valid key (variance 0): the normalised query is far below the key in
    every feature, each feature underflows, and the expansion's kernel was log(0) = -inf: it gave
    0 where attention gives the key's value."""
    from primal_dual_attention.analysis.verify import expansion_output

    for dtype in (torch.float32, torch.float64):
        q = torch.full((1, 1, 1, 4), -0.5, dtype=dtype)
        k = torch.zeros(1, 1, 3, 4, dtype=dtype)
        v = torch.tensor([7.0, 1.0, 1.0], dtype=dtype).view(1, 1, 3, 1)
        mask = torch.tensor([[False, True, True]])
        expected = attention(q, k, v, kernel="linear", bn=True, key_padding_mask=mask)
        expanded = expansion_output(q, k, v, kernel="linear", bn=True, head_scales=None, window=None,
                                    mask=mask)
        torch.testing.assert_close(expanded, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("mask", [torch.zeros(2, 6, dtype=torch.int64), torch.zeros(6, dtype=torch.bool),
                                  torch.zeros(1, 6, dtype=torch.bool)], ids=["int", "1-d", "one-row"])
def test_primal_training_set_refuses_a_mask_attention_refuses(mask):
    """An int mask gave pooled keys of negated sums (``~`` of 0/1 is -1/-2) and inf or NaN after BN;
    a (N,) or (1, N) mask failed deep inside or broadcast over the batch."""
    keys, values = torch.randn(2, 6, 4, dtype=torch.float64), torch.randn(2, 6, 3, dtype=torch.float64)
    with pytest.raises((TypeError, ValueError), match="key_padding_mask must"):
        dual_to_primal(keys, values, EluFeatureMap(), key_padding_mask=mask, bn=True, head_scale=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bn_primal_in_half_precision_follows_its_float64_layer(dtype):
    """BN's statistics are float32 (SPEC.md §2); the normalised keys came back float32 beside
    half-precision values and the layer's product failed."""
    generator = torch.Generator().manual_seed(0)
    keys, values, queries = (torch.randn(1, 9, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    exact = dual_to_primal(keys, values, EluFeatureMap(), bn=True)(queries)
    low = dual_to_primal(keys.to(dtype), values.to(dtype), EluFeatureMap(), bn=True)(queries.to(dtype))
    assert low.dtype == dtype
    torch.testing.assert_close(low.double(), exact, rtol=0, atol=0.05)


def test_primal_of_a_vit_sh_head_pools_on_its_grid():
    """``dual_to_primal`` takes a ViT layer's grid and class token, as ``training_set`` does: the
    primal of a 2-D SH head equals its attention (without them it pooled 1-D, class token included)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 17, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    grid = dict(grid_size=(4, 4), num_prefix_tokens=1)
    expected = attention(q, k, v, kernel="linear", head_scales=(2,), **grid)
    primal = dual_to_primal(k, v, EluFeatureMap(), head_scale=2, **grid)(q)
    torch.testing.assert_close(primal, expected, rtol=0, atol=1e-12)


def test_verify_checks_bn_statistics_instead_of_sharing_them(monkeypatch):
    """The expansions of ``pda verify`` take BN's key statistics from their own code: wrong
    statistics in attention (here the variance x4) fail its BN rows, which passed before because
    both sides called one helper."""
    import primal_dual_attention.functional as functional

    moments = functional._masked_moments

    def wrong(x, mask):
        mean, centred, var = moments(x, mask)
        return mean, centred, 4 * var

    monkeypatch.setattr(functional, "_masked_moments", wrong)
    failing = [s.name for s in exact_statements() if not s.passed]
    assert failing and all("BN" in name for name in failing)
    assert any("SVR expansion" in name for name in failing)


class _Layer(torch.nn.Module):
    """One attention layer as a model: ``forward(x, mask)``."""

    def __init__(self, **config):
        super().__init__()
        self.attn = MultiHeadAttention(16, 4, **config)

    def forward(self, x, mask=None):
        return self.attn(x, key_padding_mask=mask)


@pytest.mark.parametrize("config", [
    dict(variant="sh", grid_size=(4, 4), num_prefix_tokens=1, head_scales=(1, 2, 2, 3)),
    dict(variant="bn_sh", grid_size=(4, 4), num_prefix_tokens=1),
    dict(variant="bn_sh", causal=True),
    dict(variant="linear_bn", causal=True),
    dict(variant="sparse", window=2, causal=True),
], ids=["sh-grid", "bn_sh-grid", "bn_sh-causal", "linear_bn-causal", "sparse-causal"])
def test_verify_expands_grids_prefixes_and_causal_layers(config):
    """``pda verify`` on real layers: the expansion pools on the layer's grid, keeps its prefix
    tokens and takes causal prefixes, so it matches the fused layer (it reported errors of ~1)."""
    torch.manual_seed(0)
    x = torch.randn(2, 17, 16) * 3
    mask = torch.zeros(2, 17, dtype=torch.bool)
    if not config.get("grid_size"):
        mask[1, 13:] = True
    rows, box, _ = real_data_statements(_Layer(**config), x, mask, "test")
    assert rows[0].error <= 1e-10, rows[0]
    assert all(0 < low <= high < float("inf") for _, _, low, high in box)


def test_box_constraint_and_fit_use_each_heads_training_pairs():
    """The bound is that of the pairs the head fits (BN-normalised: keys of unit spread, so a
    scaled input changes nothing), not of the raw keys."""
    torch.manual_seed(0)
    x = torch.randn(1, 12, 16)
    layer = _Layer(variant="bn", qkv_bias=False)  # no bias: the keys and values scale with the input
    _, box, layers = real_data_statements(layer, x, None, "test")
    _, scaled, _ = real_data_statements(layer, x * 1000, None, "test")
    # the values scale with the input (no BN on values), the normalised keys do not
    assert scaled[0][2] == pytest.approx(1000 * box[0][2], rel=1e-4)
    module, (q, k, v, padding) = layers[0]
    rows, pairs = first_head_fit(module, q, k, v, padding)
    assert pairs == 12 and all(np.isfinite(error) for *_, error in rows)


def test_svr_predicts_float32_queries():
    keys, values = torch.randn(8, 3), torch.randn(8, 2)
    prediction = fit_svr(keys, values, "softmax", C=1.0, epsilon=0.0).predict(keys)
    assert prediction.dtype == torch.float32 and prediction.shape == (8, 2)


def test_svr_fit_takes_keys_that_carry_gradients():
    """Keys straight out of a projection (requires_grad): fit and predict detach them."""
    projection = torch.nn.Linear(3, 2)
    keys = projection(torch.randn(6, 3))
    fit = fit_svr(keys, torch.randn(6, 1), "softmax", C=1.0, epsilon=0.0)
    assert fit.predict(keys).shape == (6, 1)


def test_primal_layer_parameters_live_on_the_weight_device():
    layer = PrimalLayer(EluFeatureMap(), torch.zeros(2, 3, device="meta"), torch.zeros(3, device="meta"))
    assert layer.bias.device.type == "meta"
