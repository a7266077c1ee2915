"""Causal attention for every variant (SPEC.md §2 "Causal").

Definition: the causal output at position p is the non-causal variant applied to the prefix
``x_0..x_p`` (same padding rules). For a head of SH scale ``s`` that prefix pools into the
complete windows ``m < p // s`` (window ``m`` holds tokens ``m s .. m s + s - 1``) and the
*partial* window of ``p``, the valid tokens ``(p // s) s .. p`` (``s = 1``: the key ``p``
itself). Attention-BN uses the moments of exactly these (pooled) keys; for the softmax kernel
the key-side centring cancels, so only the queries change, ``q'_p = (q_p - mu_p) / s_p^2``, and
the keys go to SDPA's causal kernel unchanged (shifted by the first valid key, a constant that
cancels too and keeps the logits as small as normalising both sides would). The linear kernel
without BN runs its primal form as prefix sums, O(N).

Queries may be fewer than keys: ``q`` then holds the *last* positions (decoding against the
keys of a cache). Every function here is pure but :func:`decode`, which updates the
:class:`DecodingCache` it is given (the per-variant decoding state).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from primal_dual_attention.functional import (
    AttentionOptions,
    check_key_padding_mask,
    check_probability,
    computes_in_float16,
    elu_feature_map,
    head_groups,
    merge_heads,
    query_feature_map,
    split_heads,
    zero_padding,
)


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
    stat = torch.promote_types(k.dtype, torch.float32)  # sums in at least float32, means rounded once
    weights = (k.new_ones(batch, 1, length, 1, dtype=stat) if key_padding_mask is None
               else (~key_padding_mask)[:, None, :, None].to(stat))

    def running(x: Tensor) -> Tensor:  # (B, ., S, D) -> within-window running sums (B, ., M, s, D)
        return F.pad(x, (0, 0, 0, pad)).unflatten(2, (windows, scale)).cumsum(3)

    counts = running(weights)
    divisor = counts.clamp_min(1.0)
    partial_k = (running(k.to(stat) * weights) / divisor).to(k.dtype)
    partial_v = (running(v.to(stat) * weights) / divisor).to(v.dtype)
    return PrefixWindows(
        scale=scale, keys=partial_k[:, :, :, -1], values=partial_v[:, :, :, -1],
        valid=counts[:, 0, :, -1, 0] > 0,
        partial_keys=partial_k.flatten(2, 3)[:, :, :length],
        partial_values=partial_v.flatten(2, 3)[:, :, :length],
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


def first_valid_key(keys: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """The first valid key ``(B, h, 1, D)`` of each sequence of ``keys`` ``(B, h, M, D)``, and
    whether there is one ``(B,)`` (none: zeros)."""
    if keys.shape[2] == 0:
        return keys.new_zeros(keys.shape[0], keys.shape[1], 1, keys.shape[3]), valid.any(1)
    index = valid.to(torch.uint8).argmax(1)  # the first maximum
    first = keys.gather(2, index[:, None, None, None].expand(-1, keys.shape[1], 1, keys.shape[3]))
    return first * valid.any(1)[:, None, None, None], valid.any(1)


def prefix_moments(windows: PrefixWindows) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and biased variance of the keys each position sees (Attention-BN on the prefix),
    ``(B, h, S, D)`` each, and the shift ``(B, h, 1, D)``: sums run over ``key - shift`` in at
    least float32, with ``shift`` the first valid (pooled) key, so the one-pass variance keeps
    its precision whatever the keys' common offset. (Before that key's window closes a position
    sees one key, whose weight is 1 whatever the statistics.)"""
    stat = torch.promote_types(windows.keys.dtype, torch.float32)
    shift = first_valid_key(windows.keys, windows.valid)[0].to(stat)
    weights = windows.valid[:, None, :, None].to(stat)
    centred = (windows.keys.to(stat) - shift) * weights
    mean, var = _moments(windows.before(weights), windows.before(centred), windows.before(centred.square()),
                         windows.partial_keys, windows.partial_valid[:, None, :, None].to(stat), shift)
    return mean, var, shift


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
        mean, var, shift = prefix_moments(prefix_windows(k, v, key_padding_mask, 1))
        q = _fold_queries(q, _last(mean, num_queries), _last(var, num_queries), options.eps)
        k = k - shift.to(k.dtype)
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
    phi_q: Tensor, numerator: Tensor, denominator: Tensor, partial_keys: Tensor, partial_values: Tensor,
    partial_visible: Tensor,
) -> Tensor:
    """The linear kernel's primal form: ``numerator`` = Phi(q)^T W and ``denominator`` = Phi(q).z
    over each query's closed windows, plus its partial window:
    ``(Phi(q)^T W + Phi(q).Phi(P) Pv) / (Phi(q).z + Phi(q).Phi(P))``."""
    partial = (phi_q * elu_feature_map(partial_keys)).sum(-1, keepdim=True) * partial_visible
    return _divide(numerator + partial * partial_values, denominator + partial)


LINEAR_CHUNK = 64


def _linear_closed(phi_q: Tensor, windows: PrefixWindows) -> tuple[Tensor, Tensor]:
    """``Phi(q_p)^T W_p`` and ``Phi(q_p).z_p`` over the closed windows of every position, chunked:
    chunks of about ``LINEAR_CHUNK`` positions (whole windows) carry the primal state
    ``W = sum Phi(K) V^T`` from chunk to chunk (prefix sums), and inside a chunk the few
    windows a query also sees are summed explicitly. O(N D (chunk + Dv)), no ``(N, D, Dv)`` tensor.
    ``phi_q`` holds all ``S`` positions."""
    scale, length = windows.scale, phi_q.shape[2]
    per_chunk = max(1, LINEAR_CHUNK // scale)  # windows per chunk
    chunks = math.ceil(windows.keys.shape[2] / per_chunk)
    width = chunks * per_chunk

    def by_chunk(x: Tensor, size: int, total: int) -> Tensor:  # pad the token axis, cut it in chunks
        return F.pad(x, (0, 0, 0, total - x.shape[2])).unflatten(2, (chunks, size))

    phi_k = by_chunk(elu_feature_map(windows.keys) * windows.valid[:, None, :, None], per_chunk, width)
    values = by_chunk(windows.values, per_chunk, width)
    state = F.pad((phi_k.transpose(-2, -1) @ values).cumsum(2), (0, 0, 0, 0, 1, 0))[:, :, :-1]
    normaliser = F.pad(phi_k.sum(3).cumsum(2), (0, 0, 1, 0))[:, :, :-1, None]  # (B, h, c, 1, D)
    phi_q = by_chunk(phi_q, per_chunk * scale, width * scale)  # (B, h, c, C, D)
    local = torch.arange(per_chunk * scale, device=phi_q.device)[:, None] // scale
    inside = (phi_q @ phi_k.transpose(-2, -1)) * (torch.arange(per_chunk, device=phi_q.device) < local)
    numerator = phi_q @ state + inside @ values
    denominator = (phi_q * normaliser).sum(-1, keepdim=True) + inside.sum(-1, keepdim=True)
    return numerator.flatten(2, 3)[:, :, :length], denominator.flatten(2, 3)[:, :, :length]


def _divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` with 0 where the denominator is 0 (no visible key): finite
    values *and* gradients, where clamping to a tiny floor would give 0/0 in the backward."""
    return numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))


LINEAR_BN_QUERY_BLOCK = 8


def _query_blocks(visible: Tensor) -> list[tuple[int, int, int]]:
    """``(start, stop, width)``: blocks of queries and the number of leading windows they see.
    Compiled, every block takes every window (hidden ones give 0): widths read from the mask's
    values would break the graph at each block."""
    num_queries, num_windows = visible.shape[-2:]
    if torch.compiler.is_compiling():
        return [(start, min(start + LINEAR_BN_QUERY_BLOCK, num_queries), num_windows)
                for start in range(0, num_queries, LINEAR_BN_QUERY_BLOCK)]
    seen = visible.any(dim=0).any(dim=0)  # (T, M)
    blocks = []
    for start in range(0, seen.shape[0], LINEAR_BN_QUERY_BLOCK):
        stop = min(start + LINEAR_BN_QUERY_BLOCK, seen.shape[0])
        used = seen[start:stop].any(dim=0).nonzero()
        blocks.append((start, stop, int(used.max()) + 1 if len(used) else 0))
    return blocks


def _block_centred(keys: Tensor, shift: Tensor, inv_std: Tensor, rows: slice, width: int) -> Tensor:
    """``(B, h, t, W, D)``: ``c = (K - mu) r = K r + shift`` of the queries ``rows`` against the
    first ``width`` windows (``shift = -mu r``)."""
    return torch.addcmul(shift[:, :, rows, None], keys[:, :, None, :width], inv_std[:, :, rows, None])


class _LinearBNSimilarity(torch.autograd.Function):
    """``S_tm = sum_d a_td Phi(c_tmd)``, ``c_tmd = (K_md - mu_td) r_td``: causal linear BN's
    similarities, where the keys' features change with every query (O(T M D) elementwise work).
    Computed in query blocks against the windows each block sees, and recomputed block by
    block in the backward instead of saving ``(T, M, D)`` intermediates. With
    ``Phi(c) = Phi'(c) + max(c, 0)``, ``Phi'(c) = exp(min(c, 0))`` and the block's sums over keys
    as matrix-vector products with ``G``: ``da = sum_m G Phi(c)``,
    ``dmu = -a r sum_m G Phi'(c)``, ``dr = (a / r) sum_m G Phi'(c) c`` and
    ``dK = sum_t G Phi'(c) a r``."""

    @staticmethod
    def forward(ctx, a: Tensor, keys: Tensor, mean: Tensor, inv_std: Tensor, visible: Tensor) -> Tensor:
        blocks = _query_blocks(visible)
        shift = -mean * inv_std
        out = a.new_zeros(a.shape[:3] + (keys.shape[2],))
        with torch.autocast(a.device.type, enabled=False):  # in the inputs' float32, not autocast's
            for start, stop, width in blocks:
                rows = slice(start, stop)
                centred = _block_centred(keys, shift, inv_std, rows, width)
                features = centred.clamp_max(0.0).exp_().add_(centred.clamp_min_(0.0))
                out[:, :, rows, :width] = (features @ a[:, :, rows, :, None]).squeeze(-1)
        ctx.blocks = blocks
        ctx.save_for_backward(a, keys, mean, inv_std, visible)
        return out.where(visible, 0.0)  # not out * visible: a hidden key's inf must not become NaN

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        a, keys, mean, inv_std, visible = ctx.saved_tensors
        grad = grad.to(a.dtype).where(visible, 0.0)
        shift = -mean * inv_std
        grad_a, grad_keys = torch.zeros_like(a), torch.zeros_like(keys)
        grad_mean, grad_inv = torch.zeros_like(mean), torch.zeros_like(inv_std)
        for start, stop, width in ctx.blocks:
            rows = slice(start, stop)
            a_rows, r = a[:, :, rows], inv_std[:, :, rows]
            centred = _block_centred(keys, shift, inv_std, rows, width)
            slope = centred.clamp_max(0.0).exp_()  # Phi'(c)
            g = grad[:, :, rows, None, :width]  # (B, h, t, 1, W)
            sum_slope = (g @ slope).squeeze(-2)
            grad_a[:, :, rows] = sum_slope + (g @ centred.clamp_min(0.0)).squeeze(-2)
            grad_mean[:, :, rows] = -a_rows * r * sum_slope
            grad_inv[:, :, rows] = a_rows * (g @ (slope * centred)).squeeze(-2) / r
            weighted = slope.mul_(grad[:, :, rows, :width, None]).mul_((a_rows * r)[:, :, :, None])
            grad_keys[:, :, :width] += weighted.sum(2)
        return grad_a, grad_keys, grad_mean, grad_inv, None


def _dual_weights(
    q: Tensor, keys: Tensor, visible: Tensor, partial_keys: Tensor, partial_visible: Tensor,
    moments: tuple[Tensor, Tensor] | None, shift: Tensor | None, options: AttentionOptions,
) -> Tensor:
    """Explicit weights ``(B, h, T, M + 1)`` of each query over the closed windows ``keys``
    (``visible``: ``(B, 1, T, M)``) and, last, its partial window (``partial_keys``
    ``(B, h, T, D)``, ``partial_visible`` ``(B, 1, T, 1)``); BN with the per-query ``moments``.
    Rows sum to 1, or 0 without a key (the math path and the decoding step)."""
    if options.kernel == "softmax":
        if moments is not None:  # keys shifted by a constant: it cancels and keeps the logits small
            q = _fold_queries(q, *moments, options.eps)
            shift = shift.to(keys.dtype)
            keys, partial_keys = keys - shift, partial_keys - shift
        q = q * q.shape[-1] ** -0.5  # scaled first: raw float16 dot products overflow sooner
        logits = torch.cat([q @ keys.transpose(-2, -1), (q * partial_keys).sum(-1, keepdim=True)], -1)
        visible = torch.cat([visible.expand(*logits.shape[:-1], -1),
                             partial_visible.expand(*logits.shape[:-1], 1)], -1)
        has_key = visible.any(dim=-1, keepdim=True)
        logits = logits.masked_fill(~visible, float("-inf"))
        stat = torch.promote_types(logits.dtype, torch.float32)
        weights = torch.softmax(logits.masked_fill(~has_key, 0.0), dim=-1, dtype=stat)
        return (weights * has_key).to(q.dtype)
    if moments is not None:  # Phi((x - mu_p) / s_p): the keys' features change with every query
        mean, var = moments
        inv_std = torch.rsqrt(var + options.eps)
        phi_q = query_feature_map(((q - mean) * inv_std).to(q.dtype))
        stat = inv_std.dtype
        similarity = _LinearBNSimilarity.apply(phi_q.to(stat), keys.to(stat), mean, inv_std,
                                               visible.expand(*phi_q.shape[:3], -1)).to(q.dtype)
        phi_p = elu_feature_map(((partial_keys - mean) * inv_std).to(q.dtype))
    else:
        phi_q = query_feature_map(q)
        similarity = phi_q @ elu_feature_map(keys).transpose(-2, -1)
        phi_p = elu_feature_map(partial_keys)
    partial = (phi_q * phi_p).sum(-1, keepdim=True) * partial_visible
    similarity = torch.cat([similarity * visible, partial], -1) if moments is None else \
        torch.cat([similarity, partial], -1)
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
        phi_q = query_feature_map(F.pad(q, (0, 0, k.shape[2] - num_queries, 0)))  # at every position
        numerator, denominator = (_last(x, num_queries) for x in _linear_closed(phi_q, windows))
        return _linear_primal(_last(phi_q, num_queries), numerator, denominator, partial_keys, partial_values,
                              partial_visible), None
    moments = shift = None
    if options.bn:
        mean, var, shift = prefix_moments(windows)
        moments = (_last(mean, num_queries), _last(var, num_queries))
    attn = _dual_weights(q, windows.keys, _causal_visible(windows, num_queries, options.window),
                         partial_keys, partial_visible, moments, shift, options)
    maps = attn if dropout_p == 0.0 else F.dropout(attn, dropout_p)
    out = maps[..., :-1] @ windows.values + maps[..., -1:] * partial_values
    if not need_weights:
        return out, None
    return out, _spread(maps[..., :-1], maps[..., -1:], windows, key_padding_mask)  # after dropout


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


def _runs_in_float32(q: Tensor, options: AttentionOptions) -> bool:
    """Whether a float16 computation runs in float32 instead: Attention-BN, because
    ``(q - mu) / s^2`` reaches ``|q - mu| / eps`` where a position sees keys without variance (the
    first position sees one), and feature-map kernels, whose prefix sums ``Phi(q).z`` grow with
    the position (past float16's 65504 near position 700 at head dim 64: outputs 0)."""
    return computes_in_float16(q) and (options.bn or options.kernel != "softmax")


@contextmanager
def _in_float32(*tensors: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """``tensors`` in float32, with autocast off (see :func:`_runs_in_float32`); the decoding
    cache then holds float32 state."""
    with torch.autocast(tensors[0].device.type, enabled=False):
        yield tuple(t.float() for t in tensors)


def _to(result: Tensor | tuple[Tensor, Tensor], dtype: torch.dtype) -> Tensor | tuple[Tensor, Tensor]:
    return tuple(t.to(dtype) for t in result) if isinstance(result, tuple) else result.to(dtype)


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
    if _runs_in_float32(q, options):
        with _in_float32(q, k, v) as (q, k, v):
            return _to(causal_attention(q, k, v, options, key_padding_mask=key_padding_mask,
                                        dropout_p=dropout_p, need_weights=need_weights), torch.float16)
    batch, num_heads, length = k.shape[:3]
    options = options.for_heads(num_heads)  # an SH config without scales: a layer's defaults
    key_padding_mask = check_key_padding_mask(key_padding_mask, batch, length)
    k, v = zero_padding(key_padding_mask, k, v)
    options.check_input(num_heads, length)
    check_probability("dropout_p", dropout_p)
    groups = head_groups(options.head_scales, num_heads)
    outputs, maps = [], []
    for group, q_g, k_g, v_g in zip(groups, split_heads(q, groups), split_heads(k, groups),
                                    split_heads(v, groups), strict=True):
        out, weights = _causal_group(q_g, k_g, v_g, group.scale, options, key_padding_mask, dropout_p,
                                     need_weights)
        outputs.append(out)
        maps.append(weights)
    out = merge_heads(outputs, groups, num_heads)
    return (out, merge_heads(maps, groups, num_heads)) if need_weights else out


# --------------------------------------------------------------------------------------------
# incremental decoding
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupState:
    """The decoding state of one head group (one SH scale) after some tokens.

    Always: ``shift`` ``(B, h, 1, D)``, BN's reference (the first valid closed window's key, 0
    before), and the sums of
    the open (partial) window's valid keys and values with their count ``(B, 1, 1, 1)``. Closed
    windows are kept as ``keys, values`` ``(B, h, M, D)`` and ``valid`` ``(B, M)`` when the kernel
    needs them (softmax, BN, a sparse window: then only the last ``window``), their BN
    ``moments`` (count, sums of ``K - shift`` and of its square), and, for the linear kernel
    without BN, only its primal weights ``primal`` = sum Phi(K) V^T and ``normaliser`` = sum Phi(K).
    """

    shift: Tensor
    open_keys: Tensor
    open_values: Tensor
    open_count: Tensor
    keys: Tensor | None = None
    values: Tensor | None = None
    valid: Tensor | None = None
    moments: tuple[Tensor, Tensor, Tensor] | None = None
    primal: Tensor | None = None
    normaliser: Tensor | None = None

    def nbytes(self) -> int:
        tensors = [getattr(self, f.name) for f in fields(self)]
        tensors = [t for value in tensors if value is not None
                   for t in (value if isinstance(value, tuple) else (value,))]
        return sum(t.numel() * t.element_size() for t in tensors)


class DecodingCache:
    """The decoding state of one causal attention layer (SPEC.md §2 "Causal").

    Create it empty and hand it to the layer, ``layer(x, cache=cache)``: the first call runs the
    full causal pass on ``x`` (the prompt) and keeps the state, later calls take the next tokens
    and update it. Per head group it holds what its variant needs: keys and values (softmax),
    plus running key moments (BN), closed pooled windows plus the open window's running sums
    (SH), or the constant primal state ``(sum Phi(k) v^T, sum Phi(k))`` (linear).
    """

    def __init__(self) -> None:
        self.length = 0  # tokens fed, padding included
        self.valid_tokens: Tensor | None = None  # (B,) tokens fed that are not padding
        self.groups: list[GroupState] = []
        self.dtype: torch.dtype | None = None  # of the prompt's keys (float16 runs in float32)
        self._layer: weakref.ref | None = None  # the layer whose state this is (:meth:`claim`)

    def claim(self, layer: object) -> None:
        """Bind the cache to ``layer`` on its first use; another layer's use is an error (one
        cache per layer: a shared one would mix two layers' keys)."""
        if self._layer is None:
            self._layer = weakref.ref(layer)
        elif self._layer() is not layer:
            raise ValueError("this DecodingCache holds another layer's state; give every layer its own cache")

    def __getstate__(self) -> dict:
        """Pickled and copied without its layer (a weak reference): the copy's first user claims it."""
        return self.__dict__ | {"_layer": None}

    def nbytes(self) -> int:
        """Bytes of the tensors held."""
        return sum(group.nbytes() for group in self.groups)


def _keeps_keys(options: AttentionOptions) -> bool:
    return options.kernel == "softmax" or options.bn or options.window is not None


def _close(
    state: GroupState, keys: Tensor, values: Tensor, valid: Tensor, options: AttentionOptions
) -> GroupState:
    """``state`` with the closed windows ``keys, values`` ``(B, h, m, D)`` (``valid`` ``(B, m)``) added."""
    updates: dict[str, object] = {}
    weights = valid[:, None, :, None].to(keys.dtype)
    if _keeps_keys(options):
        kept = [torch.cat([old, new], dim) for old, new, dim in
                ((state.keys, keys, 2), (state.values, values, 2), (state.valid, valid, 1))]
        if options.window is not None:  # a sparse query sees only the last `window` keys
            kept = [x[:, :, max(x.shape[2] - options.window, 0):] if x.ndim == 4
                    else x[:, max(x.shape[1] - options.window, 0):] for x in kept]
        updates.update(keys=kept[0], values=kept[1], valid=kept[2])
    if options.bn:
        stat = state.shift.dtype
        count, total, squares = state.moments
        first, found = first_valid_key(keys.to(stat), valid)
        shift = torch.where((count[:, :, :, :1] == 0) & found[:, None, None, None], first, state.shift)
        centred = (keys.to(stat) - shift) * weights.to(stat)
        updates["shift"] = shift
        updates["moments"] = (count + weights.to(stat).sum(2, keepdim=True),
                              total + centred.sum(2, keepdim=True),
                              squares + centred.square().sum(2, keepdim=True))
    elif options.kernel == "linear" and options.window is None:
        stat = state.primal.dtype
        phi = elu_feature_map(keys).to(stat) * weights.to(stat)
        updates.update(primal=state.primal + phi.transpose(-2, -1) @ values.to(stat),
                       normaliser=state.normaliser + phi.sum(2, keepdim=True))
    return replace(state, **updates)


def _empty_state(k: Tensor, v: Tensor, options: AttentionOptions) -> GroupState:
    """The state before any token (``k, v``: the first tokens, for shapes and dtypes)."""
    batch, heads, _, dim = k.shape
    stat = torch.promote_types(k.dtype, torch.float32)
    state = GroupState(shift=k.new_zeros(batch, heads, 1, dim, dtype=stat),
                       open_keys=k.new_zeros(batch, heads, 1, dim, dtype=stat),
                       open_values=v.new_zeros(batch, heads, 1, v.shape[-1], dtype=stat),
                       open_count=k.new_zeros(batch, 1, 1, 1, dtype=stat))
    if _keeps_keys(options):
        state = replace(state, keys=k[:, :, :0], values=v[:, :, :0],
                        valid=torch.zeros(batch, 0, dtype=torch.bool, device=k.device))
    if options.bn:
        state = replace(state, moments=(k.new_zeros(batch, 1, 1, 1, dtype=stat),
                                        k.new_zeros(batch, heads, 1, dim, dtype=stat),
                                        k.new_zeros(batch, heads, 1, dim, dtype=stat)))
    elif options.kernel == "linear" and options.window is None:  # running sums in at least float32:
        # in float16 / bfloat16 a token's Phi(k) rounds away once the sums are large
        state = replace(state, primal=k.new_zeros(batch, heads, dim, v.shape[-1], dtype=stat),
                        normaliser=k.new_zeros(batch, heads, 1, dim, dtype=stat))
    return state


def _prefill(k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: int,
             options: AttentionOptions) -> GroupState:
    """The state after the ``S`` tokens of ``k, v``: ``S // scale`` closed windows, the rest open."""
    closed = k.shape[2] // scale
    windows = prefix_windows(k, v, key_padding_mask, scale)
    state = _close(_empty_state(k, v, options), windows.keys[:, :, :closed], windows.values[:, :, :closed],
                   windows.valid[:, :closed], options)
    stat = state.open_keys.dtype
    weights = (k.new_ones(k.shape[0], 1, k.shape[2], 1, dtype=stat) if key_padding_mask is None
               else (~key_padding_mask)[:, None, :, None].to(stat))[:, :, closed * scale:]
    return replace(state, open_keys=(k[:, :, closed * scale:].to(stat) * weights).sum(2, keepdim=True),
                   open_values=(v[:, :, closed * scale:].to(stat) * weights).sum(2, keepdim=True),
                   open_count=weights.sum(2, keepdim=True))


def _step(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, state: GroupState, scale: int, position: int,
          options: AttentionOptions) -> tuple[Tensor, GroupState]:
    """One token at ``position`` (``q, k, v``: ``(B, h, 1, D)``, ``valid``: ``(B,)``): its
    output from the state, and the state with it added (its window closed when full)."""
    weight = valid[:, None, None, None].to(state.open_keys.dtype)  # the open sums: at least float32
    state = replace(state, open_keys=state.open_keys + k * weight, open_values=state.open_values + v * weight,
                    open_count=state.open_count + weight)
    count = state.open_count.clamp_min(1.0)
    partial_keys = (state.open_keys / count).to(k.dtype)  # rounded once, as prefix_windows
    partial_values = (state.open_values / count).to(v.dtype)
    partial_visible = state.open_count > 0
    if state.primal is not None:
        stat = state.primal.dtype
        phi_q = query_feature_map(q).to(stat)
        out = _linear_primal(phi_q, phi_q @ state.primal, (phi_q * state.normaliser).sum(-1, keepdim=True),
                             partial_keys.to(stat), partial_values.to(stat), partial_visible).to(q.dtype)
    else:
        moments = None
        if options.bn:
            moments = _moments(*state.moments, partial_keys, partial_visible.to(state.shift.dtype),
                               state.shift)
        attn = _dual_weights(q, state.keys, state.valid[:, None, None, :], partial_keys, partial_visible,
                             moments, state.shift, options)
        out = attn[..., :-1] @ state.values + attn[..., -1:] * partial_values
    if (position + 1) % scale == 0:
        state = _close(replace(state, open_keys=torch.zeros_like(state.open_keys),
                               open_values=torch.zeros_like(state.open_values),
                               open_count=torch.zeros_like(state.open_count)),
                       partial_keys, partial_values, partial_visible[:, 0, 0], options)
    return out, state


def decode(
    q: Tensor, k: Tensor, v: Tensor, options: AttentionOptions, cache: DecodingCache,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Causal attention of ``T`` new tokens after the ``cache.length`` tokens the cache holds;
    updates ``cache``. ``q, k, v``: ``(B, H, T, D)``; ``key_padding_mask``: ``(B, T)``. An empty
    cache runs the full causal pass (the prompt) and keeps its state; a filled one steps token by
    token through :class:`GroupState`, which reproduces the full pass."""
    _check_causal_qkv(q, k, v)
    if _runs_in_float32(q, options):
        with _in_float32(q, k, v) as (q, k, v):
            return decode(q, k, v, options, cache, key_padding_mask).half()
    batch, num_heads, length = k.shape[:3]
    options = options.for_heads(num_heads)  # an SH config without scales: a layer's defaults
    key_padding_mask = check_key_padding_mask(key_padding_mask, batch, length)
    k, v = zero_padding(key_padding_mask, k, v)
    options.check_input(num_heads, length)
    groups = head_groups(options.head_scales, num_heads)
    if q.shape[2] != length:
        raise ValueError(f"decoding takes one query per new token, got {q.shape[2]} queries and "
                         f"{length} keys")
    if cache.length == 0:
        out = causal_attention(q, k, v, options, key_padding_mask=key_padding_mask)
        cache.groups = [_prefill(k_g, v_g, key_padding_mask, group.scale, options) for group, k_g, v_g in
                        zip(groups, split_heads(k, groups), split_heads(v, groups), strict=True)]
        cache.length, cache.dtype = length, k.dtype
        cache.valid_tokens = (torch.full((batch,), length, device=k.device) if key_padding_mask is None
                              else (~key_padding_mask).sum(1))
        return out
    if cache.groups[0].shift.shape[0] != batch:
        raise ValueError(f"the cache holds {cache.groups[0].shift.shape[0]} sequences, "
                         f"got a batch of {batch}")
    held = (getattr(cache, "dtype", None) or k.dtype, cache.valid_tokens.device)
    if held != (k.dtype, k.device):
        raise ValueError(f"the cache holds {held[0]} tokens on {held[1]}, got {k.dtype} on {k.device}: "
                         "decode every step in the prompt's dtype and device (under the same autocast)")
    if length == 0:  # no new token: nothing to attend, the cache unchanged
        return q.new_zeros(*q.shape[:3], v.shape[-1])
    valid = torch.ones(batch, length, dtype=torch.bool, device=k.device) if key_padding_mask is None \
        else ~key_padding_mask
    parts = [split_heads(x, groups) for x in (q, k, v)]
    outputs = []
    for t in range(length):
        position = cache.length + t
        token = []
        for index, group in enumerate(groups):
            q_g, k_g, v_g = (x[index][:, :, t : t + 1] for x in parts)
            out, cache.groups[index] = _step(q_g, k_g, v_g, valid[:, t], cache.groups[index], group.scale,
                                             position, options)
            token.append(out)
        outputs.append(merge_heads(token, groups, num_heads))
    cache.length += length
    cache.valid_tokens = cache.valid_tokens + valid.sum(1)
    return torch.cat(outputs, dim=2)


def cache_bytes_per_token(options: AttentionOptions, num_heads: int, head_dim: int, num_tokens: int = 1024,
                          dtype: torch.dtype = torch.float32) -> float:
    """Bytes per token of one layer's decoding cache for one sequence of ``num_tokens`` tokens
    (``options`` with its SH scales set, e.g. a layer's ``config``). Softmax keeps ``2 H D``
    numbers per token, SH about ``sum_h 1/s_h`` of them, linear a constant."""
    q, k, v = (torch.randn(1, num_heads, num_tokens, head_dim, dtype=dtype) for _ in range(3))
    cache = DecodingCache()
    decode(q, k, v, options, cache)
    return cache.nbytes() / num_tokens
