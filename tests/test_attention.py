"""MultiHeadAttention: every variant, nn.MultiheadAttention parity, padding, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
from reference import reference_attention

from primal_dual_attention import VARIANTS, MultiHeadAttention, attention

DIM, HEADS = 16, 4


def make(variant: str, **kwargs) -> MultiHeadAttention:
    if VARIANTS[variant].sparse:
        kwargs.setdefault("window", 2)
    return MultiHeadAttention(DIM, HEADS, variant=variant, **kwargs).double().eval()


def ragged_mask(n: int, lengths: list[int]) -> torch.Tensor:
    return torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]


def project(module: MultiHeadAttention, x: torch.Tensor):
    b, n, _ = x.shape
    qkv = module.qkv(x).view(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fused", [True, False])
def test_module_matches_reference(variant, fused):
    """The module (one projection, pooled k and v in one call per head group) against the
    reference loop on the same projections."""
    module = make(variant, fused=fused)
    x = torch.randn(2, 11, DIM, dtype=torch.float64)
    mask = ragged_mask(11, [11, 7])
    q, k, v = project(module, x)
    spec = module.spec
    ref = reference_attention(q, k, v, kernel=spec.kernel, bn=spec.bn,
                              head_scales=module.head_scales, window=module.config.window,
                              key_padding_mask=mask)
    expected = module.proj(ref.transpose(1, 2).reshape(2, 11, DIM))
    out = module(x, key_padding_mask=mask)
    valid = ~mask
    torch.testing.assert_close(out[valid], expected[valid], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_need_weights_shapes_and_rows(variant):
    module = make(variant)
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    mask = ragged_mask(9, [9, 5])
    out, weights = module(x, key_padding_mask=mask, need_weights=True)
    assert out.shape == x.shape and weights.shape == (2, HEADS, 9, 9)
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(HEADS, 9, dtype=torch.float64))
    torch.testing.assert_close(out, module(x, key_padding_mask=mask))


def test_softmax_equals_torch_multihead_attention():
    torch_mha = torch.nn.MultiheadAttention(DIM, HEADS, batch_first=True).double().eval()
    module = make("softmax")
    module.qkv.weight.data.copy_(torch_mha.in_proj_weight)
    module.qkv.bias.data.copy_(torch_mha.in_proj_bias)
    module.proj.load_state_dict(torch_mha.out_proj.state_dict())
    x = torch.randn(3, 10, DIM, dtype=torch.float64)
    mask = ragged_mask(10, [10, 4, 7])
    expected, expected_weights = torch_mha(x, x, x, key_padding_mask=mask,
                                           average_attn_weights=False)
    out, weights = module(x, key_padding_mask=mask, need_weights=True)
    # on the valid queries: a padded token is zeroed here (inert), torch attends from its values
    valid = ~mask
    torch.testing.assert_close(out[valid], expected[valid])
    torch.testing.assert_close(weights.transpose(1, 2)[valid], expected_weights.transpose(1, 2)[valid])
    torch.testing.assert_close(module(x, key_padding_mask=mask)[valid], expected[valid])
    torch.testing.assert_close(module(x), torch_mha(x, x, x)[0])


def test_sh_unit_scales_equal_softmax_and_bn():
    torch.manual_seed(1)
    x = torch.randn(2, 12, DIM, dtype=torch.float64)
    for base, multi in (("softmax", "sh"), ("bn", "bn_sh"), ("linear", "linear_sh")):
        a = make(base)
        b = make(multi, head_scales=(1,) * HEADS)
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(b(x), a(x))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padded_batch_equals_each_sequence_alone(variant):
    module = make(variant)
    lengths = [12, 5, 9]
    x = torch.randn(3, 12, DIM, dtype=torch.float64)
    x_noise = x.clone()
    mask = ragged_mask(12, lengths)
    x_noise[mask] = 1e3  # garbage in the padding
    out = module(x_noise, key_padding_mask=mask)
    for i, length in enumerate(lengths):
        alone = module(x[i : i + 1, :length])
        torch.testing.assert_close(out[i, :length], alone[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fully_padded_sequence_gives_finite_output(variant):
    module = make(variant).float()
    x = torch.randn(2, 6, DIM)
    out = module(x, key_padding_mask=ragged_mask(6, [0, 6]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("variant", ["sh", "bn_sh"])
@pytest.mark.parametrize("prefix", [1, 2])
def test_grid_module_matches_functional(variant, prefix):
    grid = (3, 5)
    n = prefix + 15
    module = make(variant, grid_size=grid, num_prefix_tokens=prefix, head_scales=(1, 2, 3, 2))
    x = torch.randn(2, n, DIM, dtype=torch.float64)
    q, k, v = project(module, x)
    ref = attention(q, k, v, bn=module.spec.bn, head_scales=module.head_scales, grid_size=grid,
                    num_prefix_tokens=prefix)
    torch.testing.assert_close(module(x), module.proj(ref.transpose(1, 2).reshape(2, n, DIM)))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_module_gradcheck(variant):
    module = MultiHeadAttention(4, 2, variant=variant, window=1 if variant == "sparse" else None)
    module = module.double()
    x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = ragged_mask(5, [4])
    assert torch.autograd.gradcheck(lambda t: module(t, key_padding_mask=mask), (x,))


def test_dropout_active_only_in_training():
    module = make("softmax", attn_drop=0.5)
    x = torch.randn(2, 8, DIM, dtype=torch.float64)
    torch.testing.assert_close(module(x), module(x))
    module.train()
    assert not torch.allclose(module(x), module(x))


def test_device_and_dtype_arguments():
    module = MultiHeadAttention(8, 2, variant="bn_sh", dtype=torch.float64, device="cpu")
    assert module.qkv.weight.dtype == torch.float64


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dim": 10, "num_heads": 4}, "divisible"),
        ({"variant": "flash"}, "variant must be one of"),
        ({"variant": "sh", "head_scales": (1, 2)}, "one entry per head"),
        ({"variant": "sh", "head_scales": (1, 0, 2, 2)}, r"head_scales\[1\]"),
        ({"variant": "sh", "head_scales": (1, 2.5, 2, 2)}, r"head_scales\[1\]"),
        ({"variant": "softmax", "head_scales": (1, 1, 1, 1)}, "only used by the SH"),
        ({"variant": "sparse"}, "needs window"),
        ({"variant": "softmax", "window": -1}, "window must be a non-negative"),
        ({"variant": "sh", "window": 2}, "cannot be combined"),
        ({"attn_drop": 1.5}, "attn_drop"),
        ({"dropout": 0.1}, "dropout is not an attention option: MultiHeadAttention takes attn_drop"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    args = {"dim": DIM, "num_heads": HEADS} | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        MultiHeadAttention(args.pop("dim"), args.pop("num_heads"), **args)


def test_bad_forward_arguments():
    module = make("sh", grid_size=(3, 3), num_prefix_tokens=1)
    with pytest.raises(ValueError, match=r"grid_size \(3, 3\) holds 9 tokens"):
        module(torch.randn(1, 11, DIM, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, dim=16\)"):
        module(torch.randn(2, 10, 8, dtype=torch.float64))
    x = torch.randn(2, 10, DIM, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype torch.bool"):
        module(x, key_padding_mask=torch.zeros(2, 10))
    with pytest.raises(ValueError, match=r"shape \(B, N\) = \(2, 10\)"):
        module(x, key_padding_mask=torch.zeros(2, 9, dtype=torch.bool))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kernel": "cosine"}, "kernel must be one of"),
        ({"head_scales": (1, 2, 3)}, "one entry per head"),
        ({"head_scales": (1, -2, 1, 1)}, r"head_scales\[1\] must be a positive"),
        ({"head_scales": (1, True, 1, 1)}, "bool"),
        ({"window": -3}, "window must be a non-negative integer, got -3"),
        ({"window": 2, "head_scales": (1, 2, 1, 1)}, "cannot be combined"),
        ({"grid_size": (2, 2)}, "grid_size"),
        ({"key_padding_mask": torch.zeros(2, 8, dtype=torch.int64)}, "torch.bool"),
        ({"dropout_p": 1.0}, "dropout_p"),
    ],
)
def test_bad_functional_arguments(kwargs, match):
    q, k, v = (torch.randn(2, 4, 8, 3) for _ in range(3))
    with pytest.raises((ValueError, TypeError), match=match):
        attention(q, k, v, **kwargs)


def test_bad_qkv_shapes():
    good = torch.randn(2, 4, 8, 3)
    with pytest.raises(ValueError, match=r"q must have shape \(B, H, N, D\), got 3-d"):
        attention(torch.randn(2, 8, 3), good, good)
    with pytest.raises(ValueError, match="share the head dimension"):
        attention(torch.randn(2, 4, 8, 5), good, good)
    with pytest.raises(ValueError, match="same number of tokens"):
        attention(good, good, torch.randn(2, 4, 7, 3))


@pytest.mark.parametrize("kernel", ["softmax", "linear"])
@pytest.mark.parametrize("fused", [True, False])
def test_mixed_qkv_dtypes_are_refused_by_every_kernel(kernel, fused):
    """One dtype for q, k and v, named in the error: float16 queries over float32 keys ran on the
    linear kernel (cast to float32) and failed inside torch on the softmax kernel. Under autocast
    mixed dtypes are cast to its dtype, as autocast casts SDPA's inputs."""
    half, full = torch.randn(1, 2, 5, 4, dtype=torch.float16), torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match=r"q, k, v must share one dtype \(or run under autocast\), got "
                                         r"torch.float16, torch.float32, torch.float32"):
        attention(half, full, full, kernel=kernel, fused=fused)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a RoPE model's float32 q, k beside bf16 v
        out = attention(full, full, full.bfloat16(), kernel=kernel, fused=fused)
    expected = attention(full.bfloat16(), full.bfloat16(), full.bfloat16(), kernel=kernel, fused=fused)
    torch.testing.assert_close(out.float(), expected.float(), rtol=0, atol=2e-2)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_layer_prints_its_options_without_a_warning(variant):
    """``print(model)``: a sparse layer (whose window has no default) printed nothing but an error,
    and a one-head SH layer warned again at every print."""
    layer = MultiHeadAttention(DIM, 1, variant=variant, window=2 if VARIANTS[variant].sparse else None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = repr(layer)
    assert f"variant={variant!r}" in text
    assert ("window=2" in text) == VARIANTS[variant].sparse


@pytest.mark.parametrize("kwargs, where", [({"grid_size": (4, 4)}, r"a grid of \(4, 4\)"), ({}, "1 head")])
def test_sh_whose_default_scales_do_not_pool_says_so(kwargs, where):
    """A grid too small to pool (or one head) leaves every default scale at 1: SH would silently be
    plain attention, so the layer warns; explicit scales pool without a warning."""
    heads = 1 if not kwargs else 4
    with pytest.warns(UserWarning, match=f"default SH scales for {where} are all 1"):
        MultiHeadAttention(16, heads, variant="sh", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MultiHeadAttention(16, 4, variant="sh", head_scales=(1, 1, 2, 2), **kwargs)


def test_evaluation_mode_gives_every_module_its_own_mode_back():
    """Maps, head captures and generation run in eval mode; afterwards (also after an error) a
    submodule the user keeps in eval mode, such as a frozen BatchNorm, is not put back into
    training mode with the rest."""
    from primal_dual_attention.attention import evaluation_mode

    model = torch.nn.Sequential(MultiHeadAttention(DIM, HEADS), torch.nn.BatchNorm1d(DIM)).train()
    model[1].eval()  # frozen statistics
    with pytest.raises(RuntimeError, match="inside"), evaluation_mode(model):
        assert not any(m.training for m in model.modules())
        raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == [True, True, True, True, True, False]
