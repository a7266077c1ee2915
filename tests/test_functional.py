"""The functional API against the loop reference of SPEC.md §2 (tests/reference.py)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_attention

from primal_dual_attention import functional as PF
from primal_dual_attention.functional import attention

KERNEL_BN = list(itertools.product(["softmax", "linear"], [False, True]))


def qkv(batch=2, heads=4, n=11, d=8, dtype=torch.float64):
    return [torch.randn(batch, heads, n, d, dtype=dtype) for _ in range(3)]


def ragged_mask(batch: int, n: int, lengths: list[int]) -> torch.Tensor:
    return torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("kernel,bn", KERNEL_BN)
@pytest.mark.parametrize("scales", [None, (1, 2, 3, 4), (2, 1, 2, 5)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_matches_reference_float64(kernel, bn, scales, masked, fused):
    q, k, v = qkv()
    mask = ragged_mask(2, 11, [11, 6]) if masked else None
    out = attention(q, k, v, kernel=kernel, bn=bn, head_scales=scales, key_padding_mask=mask,
                    fused=fused)
    ref = reference_attention(q, k, v, kernel=kernel, bn=bn, head_scales=scales,
                              key_padding_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel,bn", KERNEL_BN)
@pytest.mark.parametrize("scales", [None, (1, 1, 2, 4)])
def test_fused_matches_math_float32(kernel, bn, scales):
    q, k, v = qkv(n=37, d=16, dtype=torch.float32)
    mask = ragged_mask(2, 37, [30, 37])
    fused = attention(q, k, v, kernel=kernel, bn=bn, head_scales=scales, key_padding_mask=mask)
    math_out, _ = attention(q, k, v, kernel=kernel, bn=bn, head_scales=scales,
                            key_padding_mask=mask, need_weights=True)
    torch.testing.assert_close(fused, math_out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel,bn", KERNEL_BN)
@pytest.mark.parametrize("window", [0, 1, 3])
def test_sparse_window_matches_reference(kernel, bn, window):
    q, k, v = qkv(n=9)
    mask = ragged_mask(2, 9, [9, 4])
    for fused in (True, False):
        out = attention(q, k, v, kernel=kernel, bn=bn, window=window, key_padding_mask=mask,
                        fused=fused)
        ref = reference_attention(q, k, v, kernel=kernel, bn=bn, window=window,
                                  key_padding_mask=mask)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("grid", [(4, 4), (5, 3)])
@pytest.mark.parametrize("bn", [False, True])
def test_2d_grid_pooling_with_prefix_tokens(prefix, grid, bn):
    n = prefix + grid[0] * grid[1]
    q, k, v = qkv(n=n)
    scales = (1, 2, 3, 4)
    mask = ragged_mask(2, n, [n, n - 4])
    for fused in (True, False):
        out = attention(q, k, v, bn=bn, head_scales=scales, grid_size=grid,
                        num_prefix_tokens=prefix, key_padding_mask=mask, fused=fused)
        ref = reference_attention(q, k, v, bn=bn, head_scales=scales, grid_size=grid,
                                  num_prefix_tokens=prefix, key_padding_mask=mask)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel", ["softmax", "linear"])
def test_sh_with_unit_scales_equals_base(kernel):
    q, k, v = qkv()
    for bn in (False, True):
        base = attention(q, k, v, kernel=kernel, bn=bn)
        torch.testing.assert_close(attention(q, k, v, kernel=kernel, bn=bn, head_scales=(1,) * 4), base)


def test_key_centring_alone_changes_nothing_for_softmax():
    q, k, v = qkv()
    shift = torch.randn(2, 4, 1, 8, dtype=torch.float64) * 5
    torch.testing.assert_close(attention(q, k - shift, v), attention(q, k, v))


@pytest.mark.parametrize("kernel", ["softmax", "linear"])
def test_bn_invariant_to_per_feature_affine_map(kernel):
    q, k, v = qkv()
    scale = torch.randn(8, dtype=torch.float64).sign() * (torch.rand(8, dtype=torch.float64) + 0.5)
    shift = torch.randn(8, dtype=torch.float64) * 3
    eps = 1e-300  # SPEC's "exactly when eps = 0": eps must be > 0, and this one vanishes beside any variance
    base = attention(q, k, v, kernel=kernel, bn=True, eps=eps)
    mapped = attention(q * scale + shift, k * scale + shift, v, kernel=kernel, bn=True, eps=eps)
    if kernel == "softmax":  # per-feature sign flips act on both q^ and k^: the dot product holds
        torch.testing.assert_close(mapped, base, rtol=1e-9, atol=1e-10)
    else:  # elu + 1 is not odd, so only positive scales keep the linear kernel invariant
        mapped = attention(q * scale.abs() + shift, k * scale.abs() + shift, v, kernel=kernel,
                           bn=True, eps=eps)
        torch.testing.assert_close(mapped, base, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kernel,bn", KERNEL_BN)
@pytest.mark.parametrize("scales", [None, (1, 2, 3, 4)])
def test_padding_never_leaks(kernel, bn, scales):
    q, k, v = qkv(batch=1, n=13)
    length = 8
    mask = ragged_mask(1, 13, [length])
    out = attention(q, k, v, kernel=kernel, bn=bn, head_scales=scales, key_padding_mask=mask)
    k2, v2 = k.clone(), v.clone()
    k2[..., length:, :] = torch.randn_like(k2[..., length:, :]) * 100
    v2[..., length:, :] = float("1e6")
    out2 = attention(q, k2, v2, kernel=kernel, bn=bn, head_scales=scales, key_padding_mask=mask)
    torch.testing.assert_close(out[..., :length, :], out2[..., :length, :], rtol=1e-12, atol=1e-12)
    alone = attention(q[..., :length, :], k[..., :length, :], v[..., :length, :], kernel=kernel,
                      bn=bn, head_scales=scales)
    torch.testing.assert_close(out[..., :length, :], alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel,bn", KERNEL_BN)
@pytest.mark.parametrize("scales", [None, (1, 2, 3, 4)])
@pytest.mark.parametrize("fused", [True, False])
def test_fully_padded_sequence_is_zero_not_nan(kernel, bn, scales, fused):
    q, k, v = qkv(dtype=torch.float32)
    mask = ragged_mask(2, 11, [0, 5])
    out = attention(q, k, v, kernel=kernel, bn=bn, head_scales=scales, key_padding_mask=mask,
                    fused=fused)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all()


def test_linear_primal_equals_dual():
    q, k, v = qkv(n=50)
    mask = ragged_mask(2, 50, [50, 31])
    primal = attention(q, k, v, kernel="linear", key_padding_mask=mask)
    dual = attention(q, k, v, kernel="linear", key_padding_mask=mask, fused=False)
    torch.testing.assert_close(primal, dual, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("scales", [(1, 2, 3, 4), (4, 2, 4, 1)])
@pytest.mark.parametrize("grid,prefix", [(None, 0), ((3, 4), 1)])
def test_spread_maps_rows_sum_to_one(scales, grid, prefix):
    n = 13
    q, k, v = qkv(n=n)
    mask = ragged_mask(2, n, [n, 9])
    out, weights = attention(q, k, v, head_scales=scales, key_padding_mask=mask, grid_size=grid,
                             num_prefix_tokens=prefix, need_weights=True)
    assert weights.shape == (2, 4, n, n)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, n, dtype=torch.float64))
    assert (weights[1, :, :, 9:] == 0).all()  # padded keys get no weight
    # spreading preserves the output: the spread map applied to the raw values
    # equals the pooled map applied to pooled values
    torch.testing.assert_close(weights @ v, out)


@pytest.mark.parametrize("grid,prefix", [(None, 0), ((3, 4), 1)])
def test_head_pooling_rows_are_each_heads_pool_tokens(grid, prefix):
    """The packed SH matrix holds, for every head, the pooling of its own scale (SPEC.md §2)."""
    scales, n = (1, 2, 3, 2), 13
    options = PF.AttentionOptions(head_scales=scales, grid_size=grid, num_prefix_tokens=prefix)
    mask = ragged_mask(2, n, [n, 5])
    pooling, pooled_mask = PF.head_pooling(n, options, mask, dtype=torch.float64)
    x = torch.randn(2, 4, n, 3, dtype=torch.float64)
    for head, scale in enumerate(scales):
        expected, expected_mask = PF.pool_tokens(x[:, head], scale, mask, grid_size=grid,
                                                 num_prefix_tokens=prefix)
        rows, valid = expected.shape[1], ~expected_mask[..., None]  # padded keys: masked, not compared
        torch.testing.assert_close((pooling[:, head] @ x[:, head])[:, :rows] * valid, expected * valid)
        assert torch.equal(pooled_mask[:, head, :rows], expected_mask)
        assert pooled_mask[:, head, rows:].all() and (pooling[:, head, rows:] == 0).all()


@pytest.mark.parametrize("variant", ["sh", "bn_sh", "linear_sh", "linear_bn_sh"])
@pytest.mark.parametrize("grid", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_packed_heads_equal_grouped_heads(variant, grid, fused, monkeypatch):
    """With padding, eager SH runs every head in one call; outputs, maps and gradients equal the
    call per head group (float64), also for a sequence that is all padding."""
    from primal_dual_attention.attention import AttentionConfig, MultiHeadAttention

    heads, n = (4, 17) if grid else (8, 16)
    config = AttentionConfig(variant=variant, fused=fused,
                             **({"grid_size": (4, 4), "num_prefix_tokens": 1, "head_scales": (1, 2, 1, 2)}
                                if grid else {}))
    layer = MultiHeadAttention(32, heads, config, dtype=torch.float64)
    x = torch.randn(3, n, 32, dtype=torch.float64, requires_grad=True)
    mask = ragged_mask(3, n, [n, n - 6, 0])
    assert PF.packs_heads(layer.config, n, mask) and not PF.packs_heads(layer.config, n, None)

    def run() -> tuple[torch.Tensor, ...]:
        out, weights = layer(x, key_padding_mask=mask, need_weights=True)
        return out, weights, torch.autograd.grad(out.square().sum(), x)[0]

    packed = run()
    monkeypatch.setattr(PF, "PACKED_SH_MAX_TOKENS", 0)
    grouped = run()
    for a, b in zip(packed, grouped, strict=True):
        assert a.isfinite().all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("variant", ["sh", "bn_sh", "linear_bn_sh"])
@pytest.mark.parametrize("grid", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_pack_heads_switch_forces_either_path_with_the_same_result(variant, grid, padded):
    """``pack_heads=True`` packs unpadded batches too, ``False`` never packs; outputs, maps and
    gradients are the same (float64)."""
    from primal_dual_attention.attention import AttentionConfig, MultiHeadAttention

    heads, n = (4, 17) if grid else (8, 16)
    shape = {"grid_size": (4, 4), "num_prefix_tokens": 1, "head_scales": (1, 2, 4, 2)} if grid else {}
    x = torch.randn(3, n, 32, dtype=torch.float64, requires_grad=True)
    mask = ragged_mask(3, n, [n, n - 6, 1]) if padded else None
    results = []
    for pack in (True, False):
        torch.manual_seed(0)
        layer = MultiHeadAttention(32, heads, AttentionConfig(variant=variant, pack_heads=pack, **shape),
                                   dtype=torch.float64)
        assert PF.packs_heads(layer.config, n, mask) is pack
        out, weights = layer(x, key_padding_mask=mask, need_weights=True)
        results.append((out, weights, torch.autograd.grad(out.square().sum(), x)[0]))
    for a, b in zip(*results, strict=True):
        assert a.isfinite().all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_pack_heads_needs_several_scales_and_a_bool():
    one_scale = PF.AttentionOptions(head_scales=(2, 2), pack_heads=True)
    assert not PF.packs_heads(one_scale, 16, None)
    with pytest.raises(TypeError, match="pack_heads must be True, False, .flex. or None .*got 'yes'"):
        PF.AttentionOptions(head_scales=(1, 2), pack_heads="yes")


def test_pool_tokens_ceil_mode_and_masks():
    x = torch.arange(7, dtype=torch.float64).view(1, 7, 1)
    pooled, _ = PF.pool_tokens(x, 3)
    assert pooled.flatten().tolist() == [1.0, 4.0, 6.0]
    mask = torch.tensor([[False, False, False, False, True, True, True]])
    pooled, pooled_mask = PF.pool_tokens(x, 3, mask)
    assert pooled[0, :2].flatten().tolist() == [1.0, 3.0]
    assert pooled_mask.tolist() == [[False, False, True]]


def test_masked_mean_var_matches_unpadded():
    x = torch.randn(2, 3, 10, 4, dtype=torch.float64)
    mask = ragged_mask(2, 10, [10, 6])
    mean, var = PF.masked_mean_var(x, mask)
    torch.testing.assert_close(mean[1], x[1, :, :6].mean(-2, keepdim=True))
    torch.testing.assert_close(var[1], x[1, :, :6].var(-2, unbiased=False, keepdim=True))


def test_default_head_scales():
    assert PF.default_head_scales(8) == (1, 1, 2, 2, 4, 4, 8, 8)
    assert PF.default_head_scales(3) == (1, 2, 4)
    assert PF.default_head_scales(1) == (1,)
    assert PF.default_head_scales(6) == (1, 1, 2, 2, 4, 8)


@pytest.mark.parametrize("heads, grid, expected", [
    (4, (8, 8), (1, 1, 2, 2)),          # CIFAR patches: scale 4 would leave a 2x2 grid
    (3, (14, 14), (1, 2, 4)),           # DeiT: 14 / 4 -> 4 pooled rows, allowed
    (4, (16, 16), (1, 1, 2, 4)),
    (4, (32, 32), (1, 2, 4, 8)),
    (4, (4, 4), (1, 1, 1, 1)),          # too small to pool at all
])
def test_default_head_scales_on_a_grid_keep_four_pooled_tokens_per_side(heads, grid, expected):
    scales = PF.default_head_scales(heads, grid)
    assert scales == expected
    assert all(-(-min(grid) // s) >= PF.MIN_POOLED_GRID_SIDE for s in scales if s > 1)


@pytest.mark.parametrize("kernel,bn", KERNEL_BN)
@pytest.mark.parametrize("scales", [None, (1, 2)])
def test_gradcheck(kernel, bn, scales):
    q, k, v = (t.requires_grad_() for t in qkv(batch=1, heads=2, n=5, d=3))
    mask = ragged_mask(1, 5, [4])

    def fn(q, k, v):
        return attention(q, k, v, kernel=kernel, bn=bn, head_scales=scales, key_padding_mask=mask)

    assert torch.autograd.gradcheck(fn, (q, k, v))


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3), heads=st.integers(1, 4), n=st.integers(1, 17), d=st.integers(1, 6),
    kernel=st.sampled_from(["softmax", "linear"]), bn=st.booleans(), data=st.data(),
)
def test_property_against_reference(batch, heads, n, d, kernel, bn, data):
    scales = data.draw(st.one_of(st.none(), st.lists(st.integers(1, 6), min_size=heads,
                                                      max_size=heads)))
    lengths = data.draw(st.lists(st.integers(0, n), min_size=batch, max_size=batch))
    mask = ragged_mask(batch, n, lengths)
    q, k, v = qkv(batch, heads, n, d)
    for fused in (True, False):
        out = attention(q, k, v, kernel=kernel, bn=bn, head_scales=scales, key_padding_mask=mask,
                        fused=fused)
        ref = reference_attention(q, k, v, kernel=kernel, bn=bn, head_scales=scales,
                                  key_padding_mask=mask)
        valid = ~mask[:, None, :, None].expand_as(out)
        torch.testing.assert_close(out[valid], ref[valid], rtol=1e-9, atol=1e-10)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("window", [0, 3, 17])
@pytest.mark.parametrize("bn", [False, True])
def test_banded_sparse_path_matches_reference(window, bn):
    """Long sequences take the O(N * window) blocked path; it must equal the loop reference."""
    q, k, v = qkv(n=90)
    mask = ragged_mask(2, 90, [90, 41])
    out = attention(q, k, v, bn=bn, window=window, key_padding_mask=mask)
    ref = reference_attention(q, k, v, bn=bn, window=window, key_padding_mask=mask)
    valid = ~mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-10, atol=1e-12)
    assert torch.isfinite(out).all()


def test_banded_sparse_gradcheck():
    q, k, v = (t.requires_grad_() for t in qkv(batch=1, heads=1, n=13, d=2))
    mask = ragged_mask(1, 13, [10])
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention(q, k, v, window=2, key_padding_mask=mask), (q, k, v))


@pytest.mark.parametrize("kernel", ["softmax", "linear"])
@pytest.mark.parametrize("fused", [True, False])
def test_an_all_padding_sequence_has_zero_output_and_finite_gradients(kernel, fused):
    q, k, v = (torch.randn(2, 2, 5, 4, requires_grad=True) for _ in range(3))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1] = True
    out = attention(q, k, v, kernel=kernel, bn=True, key_padding_mask=mask, fused=fused)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert out[1].abs().max() == 0
    assert all(torch.isfinite(g).all() for g in grads)


def test_linear_feature_map_is_elu_plus_one_to_the_second_derivative():
    """``elu_feature_map`` (evaluated as exp(min(x, 0)) + max(x, 0)) equals elu(x) + 1 in value,
    gradient and second derivative, and keeps the input's dtype."""
    x = torch.tensor([-30.0, -2.0, -1e-8, 0.0, 1e-8, 0.5, 40.0], dtype=torch.float64, requires_grad=True)
    reference = torch.nn.functional.elu(x) + 1
    torch.testing.assert_close(PF.elu_feature_map(x), reference)
    away_from_the_kink = torch.tensor([-2.0, -0.7, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(PF.elu_feature_map, (away_from_the_kink,))
    for phi in (PF.elu_feature_map, lambda t: torch.nn.functional.elu(t) + 1):
        (grad,) = torch.autograd.grad((phi(x) * x).sum(), x, create_graph=True)
        (second,) = torch.autograd.grad(grad.sum(), x)
        if phi is PF.elu_feature_map:
            expected = second
        else:
            torch.testing.assert_close(expected, second)
    assert PF.elu_feature_map(torch.randn(4, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("pack_heads", [False, True])
def test_bn_in_float16_survives_a_head_pooled_to_one_key(pack_heads):
    """A head whose keys have no variance (scale 8 on 8 tokens: one pooled key) must not
    overflow float16 (the folded queries (q - mu) / s^2 would reach ~1e5 |q - mu|)."""
    q, k, v = (3.0 + torch.randn(2, 2, 8, 16) for _ in range(3))
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[1, 5:] = True
    options = dict(bn=True, head_scales=(1, 8), key_padding_mask=mask, pack_heads=pack_heads)
    ref = attention(q.double(), k.double(), v.double(), **options)
    out = attention(q.half(), k.half(), v.half(), **options)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kernel,fused", [("softmax", True), ("softmax", False), ("linear", True),
                                          ("linear", False)])
def test_bn_in_float16_survives_queries_far_from_a_constant_key_feature(kernel, fused):
    """A key feature without variance and a query 250 away in it: (q - mu) / sqrt(eps) is beyond
    float16's range. The feature adds the same to every key's score, so the output is float32's,
    not NaN or a zeroed row."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 8, generator=generator) for _ in range(3))
    k[..., 0] = 1.0
    q[0, 0, 0, 0] = 250.0
    options = dict(bn=True, kernel=kernel, fused=fused)
    out = attention(q.half(), k.half(), v.half(), **options)
    assert torch.isfinite(out).all()
    if kernel == "softmax":  # the linear kernel's feature map is not shift-invariant: finite only
        torch.testing.assert_close(out.float(), attention(q, k, v, **options), rtol=2e-2, atol=2e-2)


def test_an_sh_config_takes_its_default_scales_in_the_functional_call():
    """``attention(q, k, v, AttentionConfig(variant="sh"))`` pools, with the scales a layer of as
    many heads would take, rather than running softmax."""
    from primal_dual_attention import AttentionConfig

    q, k, v = qkv(heads=4, n=16)
    config = AttentionConfig(variant="sh")
    pooled = attention(q, k, v, config)
    torch.testing.assert_close(pooled, attention(q, k, v, head_scales=config.for_heads(4).head_scales))
    assert not torch.allclose(pooled, attention(q, k, v))


@pytest.mark.parametrize("value", [None, "0.1", 1.0, True])
def test_dropout_must_be_a_probability(value):
    """Bad values are named; numbers of any real type (numpy's too) are fine."""
    import numpy as np

    attention(*qkv(), dropout_p=np.float32(0.0))
    from primal_dual_attention import MultiHeadAttention

    q, k, v = qkv()
    with pytest.raises(ValueError, match="dropout_p must be a number in"):
        attention(q, k, v, dropout_p=value)
    with pytest.raises(ValueError, match="attn_drop must be a number in"):
        MultiHeadAttention(8, 2, attn_drop=value)


@pytest.mark.parametrize("scales", [None, (1, 8)])
def test_bn_gradients_in_float32_stay_accurate_without_key_variance(scales):
    """Keys with a large mean and one valid key (a short sequence, or an SH head pooled to one
    key): float32 gradients as accurate as the inputs allow. Folding BN into the queries with
    raw keys made the kernel cancel q'.mu and gave gradients of ~100 where float64 has ~0."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (100.0 + torch.randn(2, 2, 8, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[1, 1:] = True  # one valid token
    weight = torch.randn(2, 2, 8, 4, generator=generator, dtype=torch.float64) * ~mask[:, None, :, None]

    def grads(dtype: torch.dtype) -> list[torch.Tensor]:
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = attention(*inputs, bn=True, head_scales=scales, key_padding_mask=mask)
        (out.double() * weight).sum().backward()
        return [t.grad.double() for t in inputs]

    for low, high in zip(grads(torch.float32), grads(torch.float64), strict=True):
        torch.testing.assert_close(low, high, rtol=1e-4, atol=1e-4 * high.abs().max().item() + 1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_linear_bn_against_one_key_returns_its_value(fused):
    """One key: BN makes the query (q - mu) / sqrt(eps), every feature far below 0 here, whose
    elu + 1 underflows in float32; the output must still be that key's value, gradients finite."""
    k, v = torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4)
    q = (k - 0.5).requires_grad_()
    out = attention(q, k, v, kernel="linear", bn=True, fused=fused)
    torch.testing.assert_close(out, v)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_linear_bn_padding_stays_inert_in_float16():
    """Padded keys normalise to -mu / s, which overflows float16 here; the explicit matrix must
    not turn that inf into NaN in the valid rows."""
    q = torch.ones(1, 1, 3, 4, dtype=torch.float16)
    mask = torch.tensor([[False, True, True]])
    out = attention(q, -q, q, kernel="linear", bn=True, key_padding_mask=mask, fused=False)
    assert torch.isfinite(out[:, :, 0]).all()


@pytest.mark.parametrize("bn", [False, True])
def test_math_path_in_bfloat16_is_as_accurate_as_the_fused_kernel(bn):
    """Large logits (inputs around 100): the explicit path computes them in float32, as the
    fused kernel accumulates; bf16 logits were off by about 0.5 (errors of 0.1-2 in the output)."""
    q, k, v = (100.0 + torch.randn(1, 2, 8, 16) for _ in range(3))
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    expected = attention(q.double(), k.double(), v.double(), bn=bn)
    fused, math = (attention(q, k, v, bn=bn, fused=f).double() for f in (True, False))
    math_error, fused_error = (math - expected).abs().max(), (fused - expected).abs().max()
    assert math_error <= 2 * fused_error + 1e-2


@pytest.mark.parametrize("transform", [PF.bn_fold_queries, PF.bn_normalize])
@pytest.mark.parametrize("mask", [None, torch.tensor([[False, False, True, True]]),
                                  torch.tensor([[[False, True, True, True], [False, False, False, True]]])])
def test_bn_transforms_differentiate_every_returned_key(transform, mask):
    """Padded keys come back as (k - mu) (r): a caller that uses them must get their gradient
    through the statistics too (the attention kernels never do, the public function may)."""
    q = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k: transform(q, k, mask, 1e-3), (q, k))


@pytest.mark.parametrize("causal", [False, True])
def test_bn_of_float32_inputs_under_float16_autocast(causal):
    """The float16 guards look at the dtype autocast computes in, not only at the inputs'."""
    q, k, v = (torch.randn(1, 2, 8, 8) for _ in range(3))
    options = dict(bn=True, causal=causal, head_scales=None if causal else (1, 8))
    expected = attention(q.double(), k.double(), v.double(), **options)
    with torch.autocast("cpu", dtype=torch.float16):
        out = attention(q, k, v, **options)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("variant", ["softmax", "bn", "sh", "linear_bn_sh"])
@pytest.mark.parametrize("causal", [False, True])
def test_maps_under_dropout_are_those_the_output_used(variant, causal):
    """``need_weights`` with dropout: the dropped-out maps (as torch's MultiheadAttention), so
    ``maps @ v`` is the output; they were the maps before dropout."""
    from primal_dual_attention import AttentionConfig

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 5, dtype=torch.float64) for _ in range(3))
    config = AttentionConfig(variant=variant, causal=causal).for_heads(4)
    out, maps = attention(q, k, v, config, dropout_p=0.5, need_weights=True)
    torch.testing.assert_close(maps @ v, out)


def test_a_sparse_window_needs_queries_at_the_keys_positions():
    """|i - j| <= window compares query and key indices: cross-attention (other lengths, no
    shared positions) is refused, not banded by index."""
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4)
    with pytest.raises(ValueError, match="window=1 .* got 3 queries for 7 keys"):
        attention(q, k, v, window=1)
    assert attention(q, k, v).shape == (1, 2, 3, 4)


@pytest.mark.parametrize("pack_heads", [None, True, False])
@pytest.mark.parametrize("kernel", ["softmax", "linear"])
def test_values_of_another_head_size_under_sh(pack_heads, kernel):
    """``v`` may have another head size than ``q``/``k``: SH with padding (packed by default) or
    ``pack_heads=True`` stacked keys and values to pool them together and failed; it runs per
    scale and matches the loop oracle."""
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 4, 13, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 4, 13, 5, generator=generator, dtype=torch.float64)
    mask = torch.arange(13)[None] >= torch.tensor([13, 6])[:, None]
    switches = dict(kernel=kernel, bn=True, head_scales=(1, 2, 3, 4), key_padding_mask=mask)
    out = attention(q, k, v, pack_heads=pack_heads, **switches)
    assert out.shape == (2, 4, 13, 5)
    valid = ~mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[valid], reference_attention(q, k, v, **switches)[valid])
