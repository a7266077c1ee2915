"""Causal variants (SPEC.md §2 "Causal"): output i is the non-causal variant on the prefix 1..i."""

from __future__ import annotations

import pytest
import torch
from reference import reference_attention

from primal_dual_attention import VARIANTS, AttentionConfig, MultiHeadAttention, attention
from primal_dual_attention.causal import DecodingCache, cache_bytes_per_token, decode

DIM, HEADS, N = 16, 4, 11
SCALES = (2, 1, 3, 2)  # unequal, non-contiguous groups, a scale that does not divide N


def config(variant: str, **kwargs) -> AttentionConfig:
    spec = VARIANTS[variant]
    if spec.sparse:
        kwargs.setdefault("window", 2)
    if spec.multi_scale:
        kwargs.setdefault("head_scales", SCALES)
    return AttentionConfig(variant=variant, **kwargs)


def padding() -> torch.Tensor:
    """Right padding, left padding with a hole, and an all-padding sequence."""
    mask = torch.arange(N)[None, :] >= torch.tensor([N, 8, N, 0])[:, None]
    mask[2, :3] = True
    mask[2, 5] = True
    return mask


def qkv(batch: int = 4, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    q, k, v = (torch.randn(batch, HEADS, N, 5, dtype=dtype) for _ in range(3))
    return q, k + 2.0, v  # keys with a common offset, as after a bias


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fused", [True, False])
def test_function_equals_reference_on_every_prefix(variant, fused):
    """Position p of the causal pass = the loop oracle of tests/reference.py on x_1..x_p."""
    cfg = config(variant, causal=True, fused=fused)
    q, k, v = qkv()
    mask = padding()
    out = attention(q, k, v, cfg, key_padding_mask=mask)
    for p in range(N):
        expected = reference_attention(
            q[:, :, : p + 1], k[:, :, : p + 1], v[:, :, : p + 1], kernel=cfg.kernel, bn=cfg.bn,
            head_scales=cfg.head_scales, window=cfg.window, key_padding_mask=mask[:, : p + 1])
        torch.testing.assert_close(out[:, :, p], expected[:, :, p], rtol=1e-9, atol=1e-11)
    assert out[3].abs().max() == 0  # an all-padding sequence gives 0, not NaN


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fused", [True, False])
def test_module_equals_non_causal_module_on_every_prefix(variant, fused):
    causal = MultiHeadAttention(DIM, HEADS, config(variant, causal=True, fused=fused)).double().eval()
    plain = MultiHeadAttention(DIM, HEADS, config(variant, fused=fused)).double().eval()
    plain.load_state_dict(causal.state_dict())
    x = torch.randn(4, N, DIM, dtype=torch.float64)
    mask = padding()
    out = causal(x, key_padding_mask=mask)
    for p in range(N):
        expected = plain(x[:, : p + 1], key_padding_mask=mask[:, : p + 1])[:, p]
        torch.testing.assert_close(out[:3, p], expected[:3], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_future_tokens_change_nothing_before(variant):
    layer = MultiHeadAttention(DIM, HEADS, config(variant, causal=True)).double().eval()
    x = torch.randn(4, N, DIM, dtype=torch.float64)
    mask = padding()
    out = layer(x, key_padding_mask=mask)
    for i in (0, 4, N - 2):
        changed = x.clone()
        changed[:, i + 1 :] = 100 * torch.randn_like(changed[:, i + 1 :])
        flipped = mask.clone()
        flipped[:, i + 1 :] = ~flipped[:, i + 1 :]
        torch.testing.assert_close(layer(changed, key_padding_mask=flipped)[:, : i + 1], out[:, : i + 1],
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_maps_queries_at_the_end_and_gradients(variant):
    """Maps: causal, rows sum to 1 (0 without a key), maps @ v = out; the last T queries alone
    against all keys give the last T rows; an all-padding sequence has finite (zero) gradients."""
    cfg = config(variant, causal=True)
    q, k, v = (t.requires_grad_() for t in qkv())
    mask = padding()
    out, maps = attention(q, k, v, cfg, key_padding_mask=mask, need_weights=True)
    assert maps.shape == (4, HEADS, N, N)
    assert maps.triu(1).abs().max() == 0
    sums = maps[:3].sum(-1)  # 1, or 0 where linear BN's one-key features underflow (as non-causal)
    assert (((sums - 1).abs() < 1e-12) | (sums == 0)).all() and (sums[0, :, -1] > 0).all()
    torch.testing.assert_close(maps @ v, out)
    torch.testing.assert_close(attention(q[:, :, -3:], k, v, cfg, key_padding_mask=mask), out[:, :, -3:])
    attention(q, k, v, cfg, key_padding_mask=mask).sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and t.grad[3].abs().max() == 0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients(variant):
    """float64 gradcheck with padding (the hand-written backward of causal linear BN included)."""
    cfg = config(variant, causal=True)
    q, k, v = (torch.randn(2, HEADS, 7, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, :2] = mask[1, 4] = True
    assert torch.autograd.gradcheck(lambda *t: attention(*t, cfg, key_padding_mask=mask), (q, k, v),
                                    fast_mode=True)


def test_causal_refuses_grids_and_bad_queries():
    with pytest.raises(ValueError, match="1-D sequences"):
        AttentionConfig(variant="sh", causal=True, grid_size=(4, 4), num_prefix_tokens=1)
    with pytest.raises(TypeError, match="causal must be True or False"):
        AttentionConfig(causal="yes")
    q, k, v = qkv()
    with pytest.raises(ValueError, match="at most as many queries"):
        attention(torch.randn(4, HEADS, N + 1, 5, dtype=torch.float64), k, v, causal=True)


def test_causal_softmax_equals_sdpa_is_causal():
    q, k, v = qkv()
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attention(q, k, v, causal=True, fused=False), expected)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decoding_cache_reproduces_the_full_pass(variant):
    """fp32: a prompt, then single tokens and a chunk through a DecodingCache = one causal pass."""
    layer = MultiHeadAttention(DIM, HEADS, config(variant, causal=True)).eval()
    length = 23
    x = torch.randn(3, length, DIM)
    mask = torch.zeros(3, length, dtype=torch.bool)
    mask[1, :4] = True  # a left-padded prompt
    mask[2, 6] = True
    full = layer(x, key_padding_mask=mask)
    for prompt in (1, 5):
        cache = DecodingCache()
        outputs = [layer(x[:, :prompt], key_padding_mask=mask[:, :prompt], cache=cache)]
        for start, stop in [(t, t + 1) for t in range(prompt, length - 4)] + [(length - 4, length)]:
            outputs.append(layer(x[:, start:stop], key_padding_mask=mask[:, start:stop], cache=cache))
        assert cache.length == length
        torch.testing.assert_close(torch.cat(outputs, 1), full, rtol=0, atol=1e-5)


def test_cache_memory_per_token():
    """SH keeps about sum_h 1/s_h of softmax's keys; linear and sparse keep a constant."""
    def per_token(variant: str, tokens: int, **kwargs) -> float:
        layer = MultiHeadAttention(DIM, HEADS, config(variant, causal=True, **kwargs))
        return cache_bytes_per_token(layer.config, HEADS, DIM // HEADS, tokens)

    softmax = per_token("softmax", 256)
    assert softmax == pytest.approx(2 * DIM * 4 + 1, rel=0.02)  # k and v in fp32, a validity byte
    per_head = 2 * (DIM // HEADS) * 4 + 1  # a head of scale s keeps 1/s of this
    assert per_token("sh", 256, head_scales=(1, 2, 4, 8)) == pytest.approx(per_head * 15 / 8, rel=0.02)
    assert per_token("bn", 256) == pytest.approx(softmax, rel=0.01)
    for constant in ("linear", "linear_sh", "sparse"):
        assert per_token(constant, 512) == pytest.approx(per_token(constant, 256) / 2, rel=0.01)
    with pytest.raises(ValueError, match="causal layer"):
        MultiHeadAttention(DIM, HEADS)(torch.randn(1, 3, DIM), cache=DecodingCache())


@pytest.mark.parametrize("variant", [name for name, spec in VARIANTS.items() if spec.bn])
@pytest.mark.parametrize("fused", [True, False])
def test_bn_in_float16_is_finite_and_close(variant, fused):
    """The first position sees one key (no variance): (q - mu) / s^2 would overflow float16, so
    causal BN runs in float32 there (functional call, module under autocast, decoding)."""
    cfg = config(variant, causal=True, fused=fused)
    q, k, v = (t.half() for t in qkv())
    mask = padding()
    expected = attention(q.double(), k.double(), v.double(), cfg, key_padding_mask=mask)
    out = attention(q, k, v, cfg, key_padding_mask=mask)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)

    layer = MultiHeadAttention(DIM, HEADS, cfg)
    x = torch.randn(2, 6, DIM)
    with torch.no_grad():
        reference = layer.double()(x.double())
        layer.float()
        with torch.autocast("cpu", dtype=torch.float16):
            full = layer(x)
            cache = DecodingCache()
            steps = torch.cat([layer(x[:, :3], cache=cache)] + [layer(x[:, t:t + 1], cache=cache)
                                                                 for t in range(3, 6)], dim=1)
    for result in (full, steps):
        assert torch.isfinite(result).all()
        torch.testing.assert_close(result.double(), reference, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("variant", ["softmax", "bn", "sh", "linear"])
def test_decoding_no_new_token_after_a_prompt(variant):
    """An empty step returns an empty output and leaves the cache as it was."""
    layer = MultiHeadAttention(16, 4, variant=variant, causal=True).eval()
    x = torch.randn(2, 6, 16)
    cache = DecodingCache()
    layer(x[:, :5], cache=cache)
    assert layer(x[:, :0], cache=cache).shape == (2, 0, 16) and cache.length == 5
    torch.testing.assert_close(layer(x[:, 5:], cache=cache), layer(x)[:, 5:], rtol=1e-5, atol=1e-5)


def test_causal_options_refuse_grids_and_prefixes_one_message_each():
    with pytest.raises(ValueError, match="got grid_size=\\(2, 2\\)"):
        AttentionConfig(causal=True, grid_size=(2, 2))
    with pytest.raises(ValueError, match="takes no unpooled prefix; got num_prefix_tokens=9"):
        AttentionConfig(causal=True, num_prefix_tokens=9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_decoding_state_keeps_absorbing_tokens_in_half_precision(dtype):
    """After a 500-token prompt a token's Phi(k) is below half a float16/bfloat16 step of the
    running sums: they are kept in float32, so the decoded output stays the full pass's."""
    layer_options = AttentionConfig(variant="linear", causal=True)
    n, prompt = 600, 500
    q = torch.zeros(1, 1, n, 4, dtype=dtype)
    k = torch.zeros(1, 1, n, 4, dtype=dtype)
    v = torch.zeros(1, 1, n, 1, dtype=dtype)
    v[:, :, prompt:] = 1.0  # the decoded tokens carry the value: the true last output is 100 / 600
    cache = DecodingCache()
    decode(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], layer_options, cache)
    for t in range(prompt, n):
        out = decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], layer_options, cache)
    assert out.dtype == dtype
    assert float(out[0, 0, 0, 0]) == pytest.approx(100 / 600, abs=2e-3)


@pytest.mark.parametrize("variant", ["linear", "linear_sh"])
@pytest.mark.parametrize("causal", [True, False])
def test_linear_in_float16_keeps_its_sums_past_float16s_range(variant, causal):
    """Phi(q).z grows with the number of keys: at head dim 64 it passed 65504 near key 700 and the
    outputs went to 0. Float16 feature-map attention runs in float32, causal or not, decoded too."""
    torch.manual_seed(0)
    n = 1024
    q, k, v = (torch.randn(1, 1, n, 64).half() for _ in range(3))
    scales = (2,) if variant == "linear_sh" else None
    options = AttentionConfig(variant=variant, causal=causal, head_scales=scales)
    out = attention(q, k, v, options)
    exact = attention(q.double(), k.double(), v.double(), options)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), exact, atol=2e-3, rtol=0)
    if causal:
        cache = DecodingCache()
        decode(q[:, :, :900], k[:, :, :900], v[:, :, :900], options, cache)
        step = decode(q[:, :, 900:901], k[:, :, 900:901], v[:, :, 900:901], options, cache)
        torch.testing.assert_close(step.double(), exact[:, :, 900:901], atol=2e-3, rtol=0)


@pytest.mark.parametrize("pack_heads", [True, False])
def test_float16_linear_maps_keep_the_input_dtype(pack_heads):
    """The float32 computation of float16 feature-map kernels hands back float16 maps, which the
    packed SH path multiplies with its float16 pooling matrix (it crashed on float32 maps)."""
    q, k, v = (torch.randn(1, 4, 16, 8).half() for _ in range(3))
    options = AttentionConfig(variant="linear_sh", head_scales=(1, 1, 2, 4), pack_heads=pack_heads)
    out, weights = attention(q, k, v, options, need_weights=True)
    assert out.dtype == weights.dtype == torch.float16 and weights.shape == (1, 4, 16, 16)


def test_bfloat16_sh_window_means_are_rounded_once():
    """The causal SH windows' running sums are kept in float32 and each mean rounded once to
    bfloat16, as the non-causal pooling does; summed in bfloat16 they drifted several steps."""
    from primal_dual_attention.causal import prefix_windows

    torch.manual_seed(0)
    k = (3.0 + torch.randn(2, 2, 70, 8)).bfloat16()
    windows = prefix_windows(k, k, None, 7)
    exact = prefix_windows(k.double(), k.double(), None, 7)
    torch.testing.assert_close(windows.partial_keys, exact.partial_keys.bfloat16(), atol=0, rtol=2 ** -8)
    torch.testing.assert_close(windows.keys, exact.keys.bfloat16(), atol=0, rtol=2 ** -8)


def test_float16_decoding_scales_before_the_dot_product():
    """|q||k| above float16's range: the full pass is finite, so is each decoding step."""
    q = k = v = torch.full((1, 1, 3, 64), 33.0, dtype=torch.float16)
    options = AttentionConfig(causal=True)
    cache = DecodingCache()
    decode(q[:, :, :2], k[:, :, :2], v[:, :, :2], options, cache)
    out = decode(q[:, :, 2:], k[:, :, 2:], v[:, :, 2:], options, cache)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), attention(q, k, v, options)[:, :, 2:].float())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_what_padded_keys_hold_changes_no_causal_output(variant):
    """NaN and inf in padded keys and values (SPEC.md §2: padding is inert whatever it holds):
    the causal pass and decoding through a cache give the outputs of zeros there."""
    from primal_dual_attention.causal import causal_attention

    options = config(variant, causal=True)
    q, k, v = qkv()
    mask = padding()
    padded = mask[:, None, :, None]
    bad_k, bad_v = k.masked_fill(padded, float("nan")), v.masked_fill(padded, float("inf"))
    clean = causal_attention(q, k.masked_fill(padded, 0.0), v.masked_fill(padded, 0.0), options,
                             key_padding_mask=mask)
    torch.testing.assert_close(causal_attention(q, bad_k, bad_v, options, key_padding_mask=mask), clean)
    cache = DecodingCache()
    steps = [decode(q[..., :4, :], bad_k[..., :4, :], bad_v[..., :4, :], options, cache, mask[:, :4])]
    steps += [decode(q[..., t:t + 1, :], bad_k[..., t:t + 1, :], bad_v[..., t:t + 1, :], options, cache,
                     mask[:, t:t + 1]) for t in range(4, N)]
    torch.testing.assert_close(torch.cat(steps, 2), clean)


def test_an_sh_config_without_scales_takes_a_layers_defaults_in_the_causal_functions():
    """``cache_bytes_per_token(AttentionConfig(variant="sh", causal=True), ...)``: SH's cache (the
    layer's default scales), not softmax's."""
    sh, softmax = AttentionConfig(variant="sh", causal=True), AttentionConfig(causal=True)
    assert cache_bytes_per_token(sh, 8, 16, 256) == cache_bytes_per_token(sh.for_heads(8), 8, 16, 256)
    assert cache_bytes_per_token(sh, 8, 16, 256) < cache_bytes_per_token(softmax, 8, 16, 256) / 2


def test_a_cache_serves_one_layer():
    first, second = (MultiHeadAttention(DIM, HEADS, config("softmax", causal=True)).eval() for _ in range(2))
    cache = DecodingCache()
    first(torch.randn(1, 3, DIM), cache=cache)
    with pytest.raises(ValueError, match="this DecodingCache holds another layer's state"):
        second(torch.randn(1, 1, DIM), cache=cache)
    first(torch.randn(1, 1, DIM), cache=cache)  # its own layer goes on


def test_a_used_cache_pickles_and_copies():
    """A decoding state can be saved and a model forked with its caches: the copy's layer claims it."""
    import copy
    import pickle

    layer = MultiHeadAttention(DIM, HEADS, config("bn", causal=True)).eval()
    cache = DecodingCache()
    with torch.no_grad():
        layer(torch.randn(1, 3, DIM), cache=cache)
        restored = pickle.loads(pickle.dumps(cache))
        forked_layer, forked_cache = copy.deepcopy((layer, cache))
        step = torch.randn(1, 1, DIM)
        expected = layer(step, cache=cache)
        torch.testing.assert_close(forked_layer(step, cache=forked_cache), expected)
        torch.testing.assert_close(layer(step, cache=restored), expected)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_causal_layer_compiles_as_one_graph(variant):
    """``torch.compile(fullgraph=True)`` of a causal layer (a decoder's training step): head groups
    were merged after a data-dependent ``torch.equal`` and causal linear BN sized its query blocks
    from the mask's values, so every variant broke the graph. Dynamo's own backend (``eager``)
    traces it quickly; outputs and gradients equal the eager layer's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    window = 2 if VARIANTS[variant].sparse else None
    layer = MultiHeadAttention(24, 3, variant=variant, causal=True, window=window)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(2, 9, 24, requires_grad=True)
    mask = torch.arange(9)[None] < torch.tensor([0, 3])[:, None]  # left padding
    out, eager = compiled(x, key_padding_mask=mask), layer(x, key_padding_mask=mask)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    (grad,), (grad_eager,) = (torch.autograd.grad(y.sum(), x) for y in (out, eager))
    torch.testing.assert_close(grad, grad_eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["softmax", "bn_sh", "linear"])
def test_a_step_in_another_dtype_than_the_prompt_is_named(variant):
    """A prompt run under bfloat16 autocast and a step outside it (or the reverse) failed inside
    torch (``expected scalar type Float but found BFloat16``) or, for linear, ran on silently."""
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 4, variant=variant, causal=True).eval()
    x, cache = torch.randn(2, 6, 16), DecodingCache()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x[:, :5], cache=cache)
        with pytest.raises(ValueError, match=r"cache holds torch.bfloat16 tokens on cpu, got torch.float32"):
            layer(x[:, 5:], cache=cache)
