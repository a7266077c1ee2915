"""Padded positions are inert (SPEC.md §2, issue 15 item 8): whatever a padded token holds —
NaN, Inf, 1e30 — no valid output and no gradient reaching a valid input or a parameter changes,
for every variant, on the fused and the math path."""

from __future__ import annotations

import pytest
import torch

from primal_dual_attention import VARIANTS, MultiHeadAttention, attention
from primal_dual_attention.attention import AttentionConfig

POISONS = [float("nan"), float("inf"), -float("inf"), 1e30]
N, VALID = 12, 7


def poisoned(x: torch.Tensor, value: float, dim: int) -> torch.Tensor:
    """``x`` (of the second sample) with ``value`` at the padded positions along ``dim``."""
    x = x.detach().clone()
    x.select(0, 1).narrow(dim - 1, VALID, N - VALID).fill_(value)
    return x


MASK = torch.arange(N)[None, :] >= torch.tensor([N, VALID])[:, None]


def _grads(tensors, out: torch.Tensor, *params) -> list[torch.Tensor]:
    """Gradients of the valid outputs' sum (padded outputs are padding, never used)."""
    valid = (~MASK).to(out.dtype).view(2, *([1] * (out.ndim - 3)), N, 1)
    if out.ndim == 3:
        valid = valid.view(2, N, 1)
    return list(torch.autograd.grad((out * valid).sum(), [*tensors, *params]))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_module_padded_tokens_are_inert(variant, fused, causal):
    config = AttentionConfig(variant=variant, window=2 if VARIANTS[variant].sparse else None,
                             fused=fused, causal=causal)
    layer = MultiHeadAttention(16, 4, config).double()
    x = torch.randn(2, N, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x, key_padding_mask=MASK)
    reference = _grads([x], out, *layer.parameters())
    for value in POISONS:
        bad = poisoned(x, value, 1).requires_grad_()
        out_bad = layer(bad, key_padding_mask=MASK)
        torch.testing.assert_close(out_bad[~MASK], out[~MASK], rtol=1e-12, atol=1e-12)
        grads = _grads([bad], out_bad, *layer.parameters())
        grads[0] = grads[0][~MASK]
        expected = [reference[0][~MASK], *reference[1:]]
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_functional_padded_keys_and_values_are_inert(variant, fused, causal):
    spec = VARIANTS[variant]
    switches = dict(kernel=spec.kernel, bn=spec.bn, head_scales=(1, 2, 3, 5) if spec.multi_scale else None,
                    window=2 if spec.sparse else None, fused=fused, causal=causal, key_padding_mask=MASK)
    q, k, v = (torch.randn(2, 4, N, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, **switches)
    reference = _grads([q, k, v], out)
    for value in POISONS:
        bad_k, bad_v = (poisoned(t, value, 2).requires_grad_() for t in (k, v))
        out_bad = attention(q, bad_k, bad_v, **switches)
        valid = ~MASK[:, None, :, None].expand_as(out)
        torch.testing.assert_close(out_bad[valid], out[valid], rtol=1e-12, atol=1e-12)
        grads = _grads([q, bad_k, bad_v], out_bad)
        for got, want in zip(grads, reference, strict=True):
            keep = ~MASK[:, None, :, None].expand_as(got)
            torch.testing.assert_close(got[keep], want[keep], rtol=1e-10, atol=1e-12)
        # a padded query's row is padding: the valid rows do not see it
        out_q = attention(poisoned(q, value, 2), k, v, **switches)
        torch.testing.assert_close(out_q[valid], out[valid], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch,tokens", [(0, 9), (2, 0), (0, 0)])
def test_empty_batches_and_sequences_give_empty_outputs(variant, fused, causal, batch, tokens):
    """Issue 15 item 5: no reshape error on 0 samples or 0 tokens, with or without a mask."""
    spec = VARIANTS[variant]
    config = AttentionConfig(variant=variant, window=2 if spec.sparse else None, fused=fused, causal=causal)
    layer = MultiHeadAttention(16, 4, config)
    x = torch.randn(batch, tokens, 16, requires_grad=True)
    for mask in (None, torch.zeros(batch, tokens, dtype=torch.bool)):
        out, weights = layer(x, key_padding_mask=mask, need_weights=True)
        assert out.shape == x.shape and weights.shape == (batch, 4, tokens, tokens)
        assert layer(x, key_padding_mask=mask).shape == x.shape
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert grad.shape == x.shape
        q, k, v = (torch.randn(batch, 4, tokens, 4) for _ in range(3))
        switches = dict(kernel=spec.kernel, bn=spec.bn, window=config.window, fused=fused, causal=causal,
                        head_scales=(1, 2, 3, 5) if spec.multi_scale else None)
        assert attention(q, k, v, key_padding_mask=mask, **switches).shape == q.shape


@pytest.mark.parametrize("kernel", ["softmax", "linear"])
@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_queries_over_no_keys_are_finite_with_or_without_a_mask(kernel, bn, fused):
    """Cross-attention to an empty memory: Attention-BN's key statistics over no key are mean 0 and
    variance 0 whether or not a mask says so (the unmasked mean over 0 keys was NaN, and so were
    the fused outputs and every query's gradient)."""
    q = torch.randn(2, 2, 3, 4, requires_grad=True)
    k = v = torch.zeros(2, 2, 0, 4)
    switches = dict(kernel=kernel, bn=bn, fused=fused)
    out = attention(q, k, v, **switches)
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    masked = attention(q, k, v, key_padding_mask=torch.zeros(2, 0, dtype=torch.bool), **switches)
    torch.testing.assert_close(out, masked, rtol=0, atol=0)
