"""Causal attention for every variant (SPEC.md §2 "Causal").

Definition: the causal output at position p is the non-causal variant applied to the prefix
``x_0..x_p`` (same padding rules). For a head of SH scale ``s`` that prefix pools into the
complete windows ``m < p // s`` (window ``m`` holds tokens ``m s .. m s + s - 1``) and the
*partial* window of ``p``, the valid tokens ``(p // s) s .. p`` (``s = 1``: the key ``p``
itself). Attention-BN uses the moments of exactly these (pooled) keys; for the softmax kernel
the key-side centring cancels, so only the queries change, ``q'_p = (q_p - mu_p) / s_p^2``, and
the keys go to SDPA's causal kernel unchanged (shifted by one constant vector, which also
cancels). The linear kernel without BN runs its primal form as prefix sums, O(N).

Queries may be fewer than keys: ``q`` then holds the *last* positions (decoding against the
keys of a cache). Every function here is pure; the decoding state lives in :class:`DecodingCache`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from primal_dual_attention.functional import (
    AttentionOptions,
    HeadGroup,
    check_key_padding_mask,
    elu_feature_map,
    head_groups,
    split_heads,
)

if TYPE_CHECKING:
    from primal_dual_attention.attention import MultiHeadAttention


@dataclass(frozen=True)
class PrefixWindows:
    """The SH windows of one head group seen causally (SPEC.md §2 "Causal").

    ``keys, values``: ``(B, h, M, D)`` mean of each window's valid tokens, ``valid``: ``(B, M)``
    whether it holds one; ``partial_keys, partial_values``: ``(B, h, S, D)``, at position p the
    mean of the valid tokens of p's window up to p, ``partial_valid``: ``(B, S)``.
    """

    scale: int
    keys: Tensor
    values: Tensor
    valid: Tensor
    partial_keys: Tensor
    partial_values: Tensor
    partial_valid: Tensor

    def before(self, x: Tensor) -> Tensor:
        """Per-window ``(B, ., M, .)`` -> at every position p the sum over windows ``m < p // s``."""
        exclusive = F.pad(x.cumsum(2), (0, 0, 1, 0))[:, :, :-1]
        return exclusive.repeat_interleave(self.scale, dim=2)[:, :, : self.partial_keys.shape[2]]


def prefix_windows(k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: int) -> PrefixWindows:
    """Complete and partial SH windows of ``k, v`` (``(B, h, S, D)``) at window = stride ``scale``."""
    batch, _, length, _ = k.shape
    windows = math.ceil(length / scale)
    pad = windows * scale - length
    weights = (k.new_ones(batch, 1, length, 1) if key_padding_mask is None
               else (~key_padding_mask)[:, None, :, None].to(k.dtype))

    def running(x: Tensor) -> Tensor:  # (B, ., S, D) -> within-window running sums (B, ., M, s, D)
        return F.pad(x, (0, 0, 0, pad)).unflatten(2, (windows, scale)).cumsum(3)

    counts = running(weights)
    sums_k, sums_v = running(k * weights), running(v * weights)
    inv = 1.0 / counts.clamp_min(1.0)
    partial_k, partial_v = (sums_k * inv).flatten(2, 3), (sums_v * inv).flatten(2, 3)
    return PrefixWindows(
        scale=scale, keys=sums_k[:, :, :, -1] * inv[:, :, :, -1],
        values=sums_v[:, :, :, -1] * inv[:, :, :, -1], valid=counts[:, 0, :, -1, 0] > 0,
        partial_keys=partial_k[:, :, :length], partial_values=partial_v[:, :, :length],
        partial_valid=counts.flatten(2, 3)[:, 0, :length, 0] > 0)


def _moments(
    count: Tensor, total: Tensor, squares: Tensor, partial: Tensor, partial_weight: Tensor, shift: Tensor
) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of the closed windows' keys (``count`` valid ones, with sums
    ``total`` and ``squares`` of ``key - shift``) plus the partial window's key ``partial``
    (``partial_weight`` 1 when it holds a valid token). A position without a key gets
    ``(shift, 0)``; its output is 0 whatever the statistics."""
    partial = (partial.to(shift.dtype) - shift) * partial_weight
    number = (count + partial_weight).clamp_min(1.0)
    mean = (total + partial) / number
    return shift + mean, ((squares + partial.square()) / number - mean.square()).clamp_min(0.0)


def prefix_moments(windows: PrefixWindows, shift: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of the keys each position sees (Attention-BN on the prefix),
    ``(B, h, S, D)`` each. Sums run over ``key - shift`` (``shift``: a constant per head and
    feature, the first token's key) in at least float32, so the one-pass variance does not lose
    the moments to a common offset."""
    stat = torch.promote_types(windows.keys.dtype, torch.float32)
    shift = shift.to(stat)
    weights = windows.valid[:, None, :, None].to(stat)
    centred = (windows.keys.to(stat) - shift) * weights
    return _moments(windows.before(weights), windows.before(centred), windows.before(centred.square()),
                    windows.partial_keys, windows.partial_valid[:, None, :, None].to(stat), shift)


def _causal_visible(windows: PrefixWindows, num_queries: int, window: int | None) -> Tensor:
    """``(B, 1, T, M)``: query (at position p = S - T + t) sees complete window m (``m < p // s``)."""
    length = windows.partial_keys.shape[2]
    positions = torch.arange(length - num_queries, length, device=windows.keys.device)[:, None]
    m = torch.arange(windows.keys.shape[2], device=windows.keys.device)[None, :]
    visible = m < positions // windows.scale
    if window is not None:  # sparse (scale 1): keys p - w .. p
        visible = visible & (positions - m <= window)
    return visible & windows.valid[:, None, None, :]


def _last(x: Tensor, count: int) -> Tensor:
    """The last ``count`` positions of ``(B, ., S, .)`` (or ``(B, S)``)."""
    return x[:, :, -count:] if x.ndim >= 3 else x[:, -count:]


def _fold_queries(q: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """Softmax Attention-BN on the query side only: ``(q - mu) / s^2`` (SPEC.md §2 "Causal")."""
    return ((q.to(mean.dtype) - mean) / (var + eps)).to(q.dtype)


def _softmax_tokens(
    q: Tensor, k: Tensor, v: Tensor, options: AttentionOptions, key_padding_mask: Tensor | None,
    dropout_p: float,
) -> Tensor:
    """Scale-1 softmax heads (also BN and sparse) through one SDPA call with a causal mask."""
    num_queries, length = q.shape[2], k.shape[2]
    if options.bn:
        shift = k[:, :, :1]
        mean, var = prefix_moments(prefix_windows(k, v, key_padding_mask, 1), shift)
        q = _fold_queries(q, _last(mean, num_queries), _last(var, num_queries), options.eps)
        k = k - shift
    if key_padding_mask is None and options.window is None and num_queries == length:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    positions = torch.arange(length - num_queries, length, device=q.device)[:, None]
    j = torch.arange(length, device=q.device)[None, :]
    visible = j <= positions
    if options.window is not None:
        visible = visible & (positions - j <= options.window)
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask[:, None, None, :]
    has_key = visible.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible | ~has_key, dropout_p=dropout_p)
    return out * has_key


def _linear_primal(
    q: Tensor, primal: Tensor, normaliser: Tensor, partial_keys: Tensor, partial_values: Tensor,
    partial_visible: Tensor,
) -> Tensor:
    """The linear kernel's primal form on each query's closed windows (weights ``primal``
    ``(B, h, T, D, Dv)`` = sum Phi(K) V^T, ``normaliser`` = sum Phi(K)) plus its partial window:
    ``(Phi(q)^T W + Phi(q).Phi(P) Pv) / (Phi(q).z + Phi(q).Phi(P))``."""
    phi_q = elu_feature_map(q)
    partial = (phi_q * elu_feature_map(partial_keys)).sum(-1, keepdim=True) * partial_visible
    numerator = torch.einsum("bhtd,bhtde->bhte", phi_q, primal) + partial * partial_values
    return _divide(numerator, (phi_q * normaliser).sum(-1, keepdim=True) + partial)


def _divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` with 0 where the denominator is 0 (no visible key): finite
    values *and* gradients, where clamping to a tiny floor would give 0/0 in the backward."""
    return numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def _dual_weights(
    q: Tensor, keys: Tensor, visible: Tensor, partial_keys: Tensor, partial_visible: Tensor,
    moments: tuple[Tensor, Tensor] | None, shift: Tensor, options: AttentionOptions,
) -> Tensor:
    """Explicit weights ``(B, h, T, M + 1)`` of each query over the closed windows ``keys``
    (``visible``: ``(B, 1, T, M)``) and, last, its partial window (``partial_keys``
    ``(B, h, T, D)``, ``partial_visible`` ``(B, 1, T, 1)``); BN with the per-query ``moments``.
    Rows sum to 1, or 0 without a key (the math path and the decoding step)."""
    if options.kernel == "softmax":
        if moments is not None:  # keys shifted by a constant: it cancels and keeps the logits small
            q = _fold_queries(q, *moments, options.eps)
            keys, partial_keys = keys - shift, partial_keys - shift
        logits = torch.cat([q @ keys.transpose(-2, -1), (q * partial_keys).sum(-1, keepdim=True)], -1)
        visible = torch.cat([visible.expand(*logits.shape[:-1], -1),
                             partial_visible.expand(*logits.shape[:-1], 1)], -1)
        has_key = visible.any(dim=-1, keepdim=True)
        logits = (logits * q.shape[-1] ** -0.5).masked_fill(~visible, float("-inf"))
        stat = torch.promote_types(logits.dtype, torch.float32)
        weights = torch.softmax(logits.masked_fill(~has_key, 0.0), dim=-1, dtype=stat)
        return (weights * has_key).to(q.dtype)
    if moments is not None:  # Phi((x - mu_p) / s_p): the keys' features change with every query
        mean, var = moments
        inv_std = torch.rsqrt(var + options.eps)
        phi_q = elu_feature_map(((q - mean) * inv_std).to(q.dtype))
        centred = (keys[:, :, None] - mean[:, :, :, None]) * inv_std[:, :, :, None]
        phi_k = elu_feature_map(centred.to(q.dtype))
        similarity = torch.einsum("bhtd,bhtmd->bhtm", phi_q, phi_k)
        phi_p = elu_feature_map(((partial_keys - mean) * inv_std).to(q.dtype))
    else:
        phi_q = elu_feature_map(q)
        similarity = phi_q @ elu_feature_map(keys).transpose(-2, -1)
        phi_p = elu_feature_map(partial_keys)
    partial = (phi_q * phi_p).sum(-1, keepdim=True) * partial_visible
    similarity = torch.cat([similarity * visible, partial], -1)
    return _divide(similarity, similarity.sum(dim=-1, keepdim=True))


def _spread(
    complete: Tensor, partial: Tensor, windows: PrefixWindows, key_padding_mask: Tensor | None
) -> Tensor:
    """Pooled weights spread back over the tokens of their windows: ``(B, h, T, S)`` maps whose
    rows sum to 1 (SPEC.md §3), the partial window's weight over its valid tokens up to p."""
    num_queries, length = complete.shape[2], windows.partial_keys.shape[2]
    scale, device = windows.scale, complete.device
    token = torch.arange(length, device=device)
    valid = (torch.ones(1, length, dtype=torch.bool, device=device) if key_padding_mask is None
             else ~key_padding_mask)
    members = (token[None, :] // scale == torch.arange(windows.keys.shape[2], device=device)[:, None])
    members = (members & valid[:, None, :]).to(complete.dtype)  # (B, M, S)
    pooling = members / members.sum(-1, keepdim=True).clamp_min(1.0)
    positions = token[-num_queries:, None]
    own = (token[None, :] // scale == positions // scale) & (token[None, :] <= positions)
    own = (own & valid[:, None, :]).to(complete.dtype)  # (B, T, S)
    own = own / own.sum(-1, keepdim=True).clamp_min(1.0)
    return complete @ pooling[:, None] + partial * own[:, None]


def _causal_group(
    q: Tensor, k: Tensor, v: Tensor, scale: int, options: AttentionOptions,
    key_padding_mask: Tensor | None, dropout_p: float, need_weights: bool,
) -> tuple[Tensor, Tensor | None]:
    """One SH head group (one scale) of :func:`causal_attention`."""
    explicit = need_weights or not options.fused
    if options.kernel == "softmax" and scale == 1 and not explicit:
        return _softmax_tokens(q, k, v, options, key_padding_mask, dropout_p), None
    num_queries = q.shape[2]
    windows = prefix_windows(k, v, key_padding_mask, scale)
    partial_keys, partial_values = (_last(x, num_queries) for x in (windows.partial_keys,
                                                                    windows.partial_values))
    partial_visible = _last(windows.partial_valid, num_queries)[:, None, :, None]
    if (options.kernel == "linear" and not options.bn and options.window is None and dropout_p == 0.0
            and not explicit):
        phi_k = elu_feature_map(windows.keys) * windows.valid[:, None, :, None]
        weights = phi_k[..., :, None] * windows.values[..., None, :]  # (B, h, M, D, Dv)
        primal = _last(windows.before(weights.flatten(-2)), num_queries).unflatten(-1, weights.shape[-2:])
        normaliser = _last(windows.before(phi_k), num_queries)
        return _linear_primal(q, primal, normaliser, partial_keys, partial_values, partial_visible), None
    shift = k[:, :, :1]
    moments = None
    if options.bn:
        moments = tuple(_last(x, num_queries) for x in prefix_moments(windows, shift))
    attn = _dual_weights(q, windows.keys, _causal_visible(windows, num_queries, options.window),
                         partial_keys, partial_visible, moments, shift, options)
    maps = attn if dropout_p == 0.0 else F.dropout(attn, dropout_p)
    out = maps[..., :-1] @ windows.values + maps[..., -1:] * partial_values
    if not need_weights:
        return out, None
    return out, _spread(attn[..., :-1], attn[..., -1:], windows, key_padding_mask)


def _check_causal_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.ndim != 4:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must have shape (B, H, N, D), got {shape}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k, v must share B and H, k and v N, q and k D; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"causal attention takes at most as many queries as keys (the queries are the "
                         f"last positions), got {q.shape[2]} queries and {k.shape[2]} keys")


def causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    options: AttentionOptions,
    *,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Causal primal-dual attention (SPEC.md §2 "Causal"); what ``attention(..., causal=True)`` runs.

    ``q`` is ``(B, H, T, D)`` with ``T <= S``, the queries of the last ``T`` of the ``S``
    positions of ``k, v``; ``key_padding_mask`` is ``(B, S)``. Returns ``(B, H, T, Dv)``, or
    ``(out, weights)`` with ``(B, H, T, S)`` maps when ``need_weights``.
    """
    _check_causal_qkv(q, k, v)
    batch, num_heads, length = k.shape[:3]
    key_padding_mask = check_key_padding_mask(key_padding_mask, batch, length)
    options.check_input(num_heads, length)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    groups = head_groups(options.head_scales, num_heads)
    outputs, maps = [], []
    for group, q_g, k_g, v_g in zip(groups, split_heads(q, groups), split_heads(k, groups),
                                    split_heads(v, groups), strict=True):
        out, weights = _causal_group(q_g, k_g, v_g, group.scale, options, key_padding_mask, dropout_p,
                                     need_weights)
        outputs.append(out)
        maps.append(weights)
    out = merge_heads(outputs, groups)
    return (out, merge_heads(maps, groups)) if need_weights else out


def merge_heads(parts: list[Tensor], groups: list[HeadGroup]) -> Tensor:
    """Per-group ``(B, h_g, ...)`` tensors back in head order ``(B, H, ...)``."""
    order = torch.cat([torch.arange(sum(p.shape[1] for p in parts))[g.heads] for g in groups])
    merged = torch.cat(parts, dim=1)
    if torch.equal(order, torch.arange(len(order))):
        return merged
    return merged.index_select(1, torch.argsort(order).to(merged.device))


def causal_forward(
    layer: MultiHeadAttention, x: Tensor, key_padding_mask: Tensor | None = None, need_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``MultiHeadAttention.forward`` of a causal layer: project, :func:`causal_attention`,
    project back. (Pooling the input first, as the non-causal SH layer does, would save nothing:
    every position has its own partial window.)"""
    if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != layer.dim:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must have shape (B, N, dim={layer.dim}), got {shape}")
    batch, num_tokens, _ = x.shape
    qkv = layer.qkv(x).view(batch, num_tokens, 3, layer.num_heads, layer.head_dim).permute(2, 0, 3, 1, 4)
    result = causal_attention(*qkv.unbind(0), layer.config, key_padding_mask=key_padding_mask,
                              dropout_p=layer.attn_drop if layer.training else 0.0, need_weights=need_weights)
    out, weights = result if need_weights else (result, None)
    out = layer.proj_drop(layer.proj(out.transpose(1, 2).reshape(batch, num_tokens, layer.dim)))
    return (out, weights) if need_weights else out
