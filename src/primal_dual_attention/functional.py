"""Pure tensor functions for the primal-dual attention family (SPEC.md §2).

Every function here is stateless: modules in :mod:`primal_dual_attention.attention` own the
parameters and call into this file. Shapes follow SPEC.md §2: ``q, k, v`` are ``(B, H, N, D)``
and ``key_padding_mask`` is a ``(B, N)`` bool tensor where **True marks padding**.

Two execution paths share one entry point, :func:`attention`:

* the **fused** path (default) calls :func:`torch.nn.functional.scaled_dot_product_attention`
  for the softmax kernel (BN only transforms its inputs; SH makes one call per distinct scale,
  or one for every head, see :func:`packs_heads`; compiled CPU code takes the math path for
  padded calls over few keys, :func:`_compiled_cpu_prefers_math`)
  and the O(N) **primal** form for the linear kernel;
* the **math** path (``fused=False`` or ``need_weights=True``) forms the attention matrix
  explicitly. It is the reference the tests compare against and the source of attention maps.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

# --------------------------------------------------------------------------------------------
# argument checks (shared by the functional API and the modules)
# --------------------------------------------------------------------------------------------


def check_positive_int(name: str, value: object, *, allow_zero: bool = False) -> int:
    """Return ``value`` as an int, or raise naming ``name`` if it is not a (non-negative) int."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool {value!r}")
    try:
        as_int = operator.index(value)  # accepts int and numpy/torch integer scalars, not floats
    except TypeError:
        raise TypeError(
            f"{name} must be an integer, got {type(value).__name__} {value!r}"
        ) from None
    lowest = 0 if allow_zero else 1
    if as_int < lowest:
        allowed = "a non-negative integer" if allow_zero else "a positive integer"
        raise ValueError(f"{name} must be {allowed}, got {as_int}")
    return as_int


def check_probability(name: str, value: object) -> float:
    """``value`` as a dropout probability in [0, 1), or an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_head_scales(head_scales: Sequence[int], num_heads: int | None = None) -> tuple[int, ...]:
    """Validate Attention-SH scales: positive integers, one per head when ``num_heads`` is given
    (SPEC.md §2)."""
    if isinstance(head_scales, (str, bytes)) or not isinstance(head_scales, Sequence):
        raise TypeError(
            "head_scales must be a sequence of positive integers (one per head), "
            f"got {type(head_scales).__name__} {head_scales!r}"
        )
    if num_heads is not None and len(head_scales) != num_heads:
        raise ValueError(
            f"head_scales must have one entry per head ({num_heads}), "
            f"got {len(head_scales)}: {tuple(head_scales)!r}"
        )
    return tuple(check_positive_int(f"head_scales[{i}]", s) for i, s in enumerate(head_scales))


def check_grid_pair(grid_size: Sequence[int] | None) -> tuple[int, int] | None:
    """Validate the form of a 2-D token grid ``(Hg, Wg)`` (positive integers), or None."""
    if grid_size is None:
        return None
    if isinstance(grid_size, (str, bytes)) or not isinstance(grid_size, Sequence):
        raise TypeError(f"grid_size must be a pair (Hg, Wg) or None, got {grid_size!r}")
    if len(grid_size) != 2:
        raise ValueError(f"grid_size must be a pair (Hg, Wg), got {tuple(grid_size)!r}")
    return (check_positive_int("grid_size[0]", grid_size[0]),
            check_positive_int("grid_size[1]", grid_size[1]))


def check_grid(
    grid_size: Sequence[int] | None, num_tokens: int, num_prefix_tokens: int
) -> tuple[int, int] | None:
    """Validate a 2-D token grid: ``Hg * Wg`` must equal the number of non-prefix tokens."""
    grid = check_grid_pair(grid_size)
    if grid is None:
        return None
    if grid[0] * grid[1] != num_tokens - num_prefix_tokens:
        raise ValueError(
            f"grid_size {grid} holds {grid[0] * grid[1]} tokens, but the sequence has "
            f"{num_tokens} tokens minus num_prefix_tokens={num_prefix_tokens} = "
            f"{num_tokens - num_prefix_tokens}"
        )
    return grid


def check_key_padding_mask(mask: Tensor | None, batch: int, num_tokens: int) -> Tensor | None:
    """Validate a ``(B, N)`` bool padding mask (True = padding, SPEC.md §2)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must have dtype torch.bool (True = padding), got {mask.dtype}"
        )
    if tuple(mask.shape) != (batch, num_tokens):
        raise ValueError(
            f"key_padding_mask must have shape (B, N) = ({batch}, {num_tokens}), "
            f"got {tuple(mask.shape)}"
        )
    return mask


def check_eps(eps: object) -> float:
    """Attention-BN's ``eps``, a finite number > 0 (SPEC.md §2): BN divides by the keys'
    variance + eps, and a constant key feature has variance 0."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a finite number > 0 (Attention-BN divides by the keys' "
                         f"variance + eps, and a constant key feature has variance 0), got {eps!r}")
    return eps


def check_option_names(options_type: type, names: Iterable[str]) -> None:
    """Raise naming the unknown ones among ``names`` and listing ``options_type``'s fields."""
    valid = [f.name for f in fields(options_type) if f.init]
    unknown = sorted(set(names) - set(valid))
    if unknown:
        hint = ("; dropout is not an attention option: MultiHeadAttention takes attn_drop and proj_drop, "
                "attention() dropout_p" if "dropout" in unknown else "")
        raise TypeError(f"unknown attention option(s) {unknown}; valid options: {valid}{hint}")


def zero_padding(key_padding_mask: Tensor | None, *tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` ``(B, H, N, D)`` with the padded positions set to 0, so that padded keys and
    values are inert whatever they hold (SPEC.md §2): a 0/1 weight would not do, as 0 x NaN is NaN."""
    if key_padding_mask is None:
        return tensors
    padded = key_padding_mask[:, None, :, None]
    return tuple(t.masked_fill(padded, 0.0) for t in tensors)


def _autocast_inputs(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Under autocast, ``q, k, v`` of mixed dtypes (a rotary-embedding model's float32 queries and
    keys beside its low-precision values) in autocast's dtype, as autocast casts SDPA's inputs;
    outside autocast :func:`_check_qkv` refuses them."""
    tensors = (q, k, v)
    floating = all(isinstance(t, Tensor) and t.is_floating_point() for t in tensors)
    if not floating or q.dtype == k.dtype == v.dtype:
        return tensors
    device = q.device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor of shape (B, H, N, D), got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must have shape (B, H, N, D), got {t.ndim}-d {tuple(t.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"q, k, v must share batch and head sizes, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the head dimension D, got {q.shape[-1]} and {k.shape[-1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same number of tokens, got {k.shape[2]} and {v.shape[2]}")
    if not q.dtype == k.dtype == v.dtype:  # under autocast they were cast to its dtype
        raise ValueError(f"q, k, v must share one dtype (or run under autocast), got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


# --------------------------------------------------------------------------------------------
# the switches of one attention call
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AttentionOptions:
    """The math switches of SPEC.md §2 as one validated value that every function here takes.

    ``kernel``: a name in :data:`KERNELS`; ``bn``: Attention-BN; ``head_scales``: Attention-SH,
    one pooling factor per head (None: no pooling); ``window``: sparse local attention,
    ``|i - j| <= window``; ``grid_size``: pool SH keys on a 2-D ``(Hg, Wg)`` token grid;
    ``num_prefix_tokens``: leading tokens never pooled; ``eps``: Attention-BN's variance floor;
    ``fused``: SDPA / the primal form (False: the explicit math path, the tests' reference);
    ``causal``: output i is the variant applied to the prefix 1..i (:mod:`.causal`, 1-D only);
    ``pack_heads``: SH with several scales in one attention call for every head (True: keys
    pooled by one matrix product, one masked SDPA call; ``"flex"``: one FlexAttention call that
    skips the key blocks past each head's pooled keys, softmax kernel, trains on CUDA only), one
    call per scale (False), or as :func:`packs_heads` measured best (None). Same outputs any way;
    values of another head size than the keys (``attention()`` takes them) always run per scale.

    Values are checked on construction (one message per mistake); what depends on the input
    (heads, tokens) by :meth:`check_input`. A new switch is one field here and its use below.
    """

    kernel: str = "softmax"
    bn: bool = False
    head_scales: tuple[int, ...] | None = None
    window: int | None = None
    grid_size: tuple[int, int] | None = None
    num_prefix_tokens: int = 0
    eps: float = 1e-5
    fused: bool = True
    causal: bool = False
    pack_heads: bool | Literal["flex"] | None = None

    def __post_init__(self) -> None:
        get_kernel(self.kernel)
        for name in ("bn", "fused", "causal"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not (self.pack_heads is None or isinstance(self.pack_heads, bool) or self.pack_heads == "flex"):
            raise TypeError(f"pack_heads must be True, False, 'flex' or None (automatic), "
                            f"got {self.pack_heads!r}")
        if self.pack_heads == "flex" and self.kernel != "softmax":
            raise ValueError(f"pack_heads='flex' runs the softmax kernel in FlexAttention, "
                             f"got kernel={self.kernel!r}")
        if self.pack_heads == "flex" and not _flex_block_tables_available():
            raise ValueError(f"pack_heads='flex' needs FlexAttention block masks of any length "
                             f"(BlockMask.from_kv_blocks(seq_lengths=...)), which torch "
                             f"{torch.__version__} lacks")
        normalised = {
            "head_scales": None if self.head_scales is None else check_head_scales(self.head_scales),
            "window": None if self.window is None else check_positive_int(
                "window", self.window, allow_zero=True),
            "grid_size": check_grid_pair(self.grid_size),
            "num_prefix_tokens": check_positive_int(
                "num_prefix_tokens", self.num_prefix_tokens, allow_zero=True),
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)
        check_eps(self.eps)
        if self.window is not None and self.head_scales is not None and max(self.head_scales) > 1:
            raise ValueError(
                "window (sparse attention) cannot be combined with head_scales > 1: pooled keys "
                f"have no token positions; got window={self.window}, head_scales={self.head_scales}")
        if self.causal and self.grid_size is not None:
            raise ValueError("causal attention is defined on 1-D sequences (a prefix of a 2-D grid is "
                             f"not a grid); got grid_size={self.grid_size}")
        if self.causal and self.num_prefix_tokens:
            raise ValueError("causal attention pools every token in order (SPEC.md §2 \"Causal\"), so it "
                             f"takes no unpooled prefix; got num_prefix_tokens={self.num_prefix_tokens}")

    def for_heads(self, num_heads: int) -> AttentionOptions:
        """These options for ``num_heads`` heads; an ``AttentionConfig`` of an SH variant fills in
        its default scales here (plain options name their scales themselves)."""
        return self

    def check_device(self, device: torch.device | str, *, gradients: bool = True) -> None:
        """Check the options against the device they run on (``gradients``: while training).
        Called by the attention call; not by config validation, since a model trained with
        ``pack_heads="flex"`` on CUDA may be evaluated on the CPU."""
        device = torch.device(device)
        if self.pack_heads == "flex" and device.type != "cuda" and gradients:
            raise ValueError(f"pack_heads='flex' trains on CUDA only (torch's FlexAttention has no "
                             f"{device.type} backward), got device {device}; use pack_heads=True, False "
                             "or None there, or run without gradients")

    def check_input(self, num_heads: int, num_tokens: int) -> tuple[int, int] | None:
        """Check the options against ``num_heads`` heads over ``num_tokens`` keys; return the grid."""
        if self.head_scales is not None:
            check_head_scales(self.head_scales, num_heads)
        if self.num_prefix_tokens > num_tokens:
            raise ValueError(f"num_prefix_tokens={self.num_prefix_tokens} exceeds the {num_tokens} keys")
        return check_grid(self.grid_size, num_tokens, self.num_prefix_tokens)


# --------------------------------------------------------------------------------------------
# masked statistics and pooling (SPEC.md §2, Attention-BN and Attention-SH)
# --------------------------------------------------------------------------------------------


def _token_weights(mask: Tensor, like: Tensor) -> Tensor:
    """``(B, N)`` padding mask -> weights 1 (valid) / 0 (padding) broadcastable to ``like``.

    ``like`` is ``(B, ..., N, D)``; the weights get shape ``(B, 1, ..., 1, N, 1)``. A per-head
    mask ``(B, H, N)`` (the pooled keys of packed SH heads) gives ``(B, H, N, 1)``.
    """
    leading = tuple(mask.shape[:-1])
    shape = leading + (1,) * (like.ndim - 2 - len(leading)) + (mask.shape[-1], 1)
    return (~mask).to(like.dtype).view(shape)


def computes_in_float16(x: Tensor) -> bool:
    """Whether products of ``x`` run in float16: ``x`` is float16, or float16 autocast is on
    for its device (which casts the attention kernels' inputs)."""
    device = x.device.type
    return x.dtype == torch.float16 or (
        torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16)


def _masked_moments(x: Tensor, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, x - mean, var)`` over the valid tokens of ``x``, in at least float32; see
    :func:`masked_mean_var`."""
    xs = x.to(torch.promote_types(x.dtype, torch.float32))
    if key_padding_mask is None and x.shape[-2] == 0:  # no token: mean 0 and variance 0, as under a mask
        zeros = xs.new_zeros(*xs.shape[:-2], 1, xs.shape[-1])
        return zeros, xs, zeros
    if key_padding_mask is None:
        # two passes: torch.var_mean over a non-last dim is ~10-30x slower on CPU
        mean = xs.mean(dim=-2, keepdim=True)
        centred = xs - mean
        return mean, centred, centred.square().mean(dim=-2, keepdim=True)
    weights = _token_weights(key_padding_mask, xs)
    count = weights.sum(dim=-2, keepdim=True).clamp_min(1.0)
    mean = (xs * weights).sum(dim=-2, keepdim=True) / count
    centred = xs - mean
    return mean, centred, (centred.square() * weights).sum(dim=-2, keepdim=True) / count


def masked_mean_var(
    x: Tensor, key_padding_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Mean and biased variance over the valid tokens of ``x`` (SPEC.md §2, Attention-BN).

    ``x`` is ``(B, ..., N, D)``; returns ``(mean, var)`` of shape ``(B, ..., 1, D)``. A sequence
    with no valid token (no token at all, or all padding) gets mean 0 and variance 0, never NaN.
    Statistics are computed in at least float32 so that half-precision inputs keep accurate moments.
    """
    if key_padding_mask is None and x.is_cuda and x.shape[-2] > 0:  # one kernel for both moments
        var, mean = torch.var_mean(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-2,
                                   correction=0, keepdim=True)
        return mean, var
    mean, _, var = _masked_moments(x, key_padding_mask)
    return mean, var


class _BNNormalize(torch.autograd.Function):
    """Fused Attention-BN transform with a hand-derived backward (about half the passes of autograd).

    With ``x^ = (x - mu) r``, ``r = (var + eps)^-1/2`` and key statistics over the ``n`` valid keys:
    ``dq = r gq^`` and ``dk_j = r (gk^_j - w_j (S_g + k^_j S_gx) / n)``, where
    ``S_g = sum_l gk^_l + sum_i gq^`` and ``S_gx = sum_l gk^_l k^_l + sum_i gq^ q^``, over every
    returned key (padded ones too) and ``w_j`` 1 for a valid key, 0 for padding.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, key_padding_mask: Tensor | None, eps: float):
        mean, var = masked_mean_var(k, key_padding_mask)
        inv_std = torch.rsqrt(var + eps)
        shift = -mean * inv_std
        q_hat = torch.addcmul(shift, q, inv_std)
        if computes_in_float16(q):  # a query far from keys without variance: float16's largest
            largest = torch.finfo(torch.float16).max  # value, not inf (inf x a zero key^ is NaN)
            q_hat = q_hat.clamp(-largest, largest)
        q_hat = q_hat.to(q.dtype)
        k_hat = torch.addcmul(shift, k, inv_std).to(k.dtype)
        ctx.save_for_backward(q_hat, k_hat, inv_std, key_padding_mask)
        return q_hat, k_hat

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_q_hat: Tensor, grad_k_hat: Tensor):
        q_hat, k_hat, inv_std, key_padding_mask = ctx.saved_tensors
        stat = inv_std.dtype
        grad_q_hat, grad_k_hat = grad_q_hat.to(stat), grad_k_hat.to(stat)
        if key_padding_mask is None:
            weights, count = None, float(max(k_hat.shape[-2], 1))
        else:
            weights = _token_weights(key_padding_mask, grad_k_hat)
            count = weights.sum(dim=-2, keepdim=True).clamp_min(1.0)
        # every returned key (padded ones too, (k - mu) r) depends on mu and r
        sum_grad = grad_k_hat.sum(dim=-2, keepdim=True) + grad_q_hat.sum(dim=-2, keepdim=True)
        sum_grad_x = (grad_k_hat * k_hat).sum(dim=-2, keepdim=True) + (
            grad_q_hat * q_hat).sum(dim=-2, keepdim=True)
        # grad_k = r gk^ - w (r S_g / n + k^ r S_gx / n), as two fused multiply-adds
        scaled_grad, scaled_grad_x = -inv_std * sum_grad / count, -inv_std * sum_grad_x / count
        if weights is None:
            grad_k = torch.addcmul(torch.addcmul(scaled_grad, grad_k_hat, inv_std), k_hat, scaled_grad_x)
        else:
            stats_term = torch.addcmul(scaled_grad, k_hat, scaled_grad_x) * weights
            grad_k = torch.addcmul(stats_term, grad_k_hat, inv_std)
        grad_q = grad_q_hat * inv_std
        return grad_q.to(q_hat.dtype), grad_k.to(k_hat.dtype), None, None


class _BNFoldQueries(torch.autograd.Function):
    """Attention-BN for the softmax kernel with the scale folded into the queries (SPEC.md §2):
    ``q' = (q - mu) / d`` with ``d = var + eps``, and the keys only centred, ``k' = k - mu``.

    ``q'.k'_j = q^.k^_j`` exactly, so the softmax kernel sees BN's logits, with one transform
    fewer than normalising both (the centred keys come from the statistics' own pass). The keys
    are centred rather than left raw (``q'.k_j`` differs from ``q^.k^_j`` by a per-query
    constant, which the softmax ignores): raw keys make the kernel cancel ``q'.mu`` in its
    working precision, whose error ``|q'||mu|`` grows as ``1 / d``, and a key without variance
    (an SH head pooled to one key) then turned float32 rounding into gradients a thousand
    times less accurate than softmax's. Backward, with ``G = g' / d`` (which is ``dq``),
    ``g_k`` the gradient reaching ``k'`` and the masked statistics over the ``n`` valid keys:
    ``dk_j = g_k,j - (w_j / n) (sum_i G_i + sum_l g_k,l + 2 (k_j - mu) sum_i G_i.q'_i)``, the
    sum over every returned key (padded ones too: each is ``k_l - mu``) and ``w_j`` 1 for a
    valid key, 0 for padding.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, key_padding_mask: Tensor | None, eps: float):
        mean, centred, var = _masked_moments(k, key_padding_mask)
        denom = var + eps
        q_folded = (q - mean) / denom  # in the statistics' dtype (at least float32)
        ctx.save_for_backward(q_folded, centred, denom, key_padding_mask)
        ctx.dtypes = q.dtype, k.dtype
        return q_folded.to(q.dtype), centred.to(k.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_q_folded: Tensor, grad_centred: Tensor):
        q_folded, centred, denom, key_padding_mask = ctx.saved_tensors
        q_dtype, k_dtype = ctx.dtypes
        grad_q = grad_q_folded.to(denom.dtype) / denom
        grad_centred = grad_centred.to(denom.dtype)
        # every returned key (padded ones too, k - mu) depends on mu
        if key_padding_mask is None:  # n a Python number: the same sums in 3 kernels fewer
            if grad_q.shape == grad_centred.shape:
                sums = (grad_q + grad_centred).sum(dim=-2, keepdim=True)
            else:
                sums = grad_q.sum(dim=-2, keepdim=True) + grad_centred.sum(dim=-2, keepdim=True)
            sum_grad_q = (grad_q * q_folded).sum(dim=-2, keepdim=True)
            stats_term = torch.addcmul(sums, centred, sum_grad_q, value=2.0)
            grad_k = torch.add(grad_centred, stats_term, alpha=-1.0 / max(centred.shape[-2], 1))
            return grad_q.to(q_dtype), grad_k.to(k_dtype), None, None
        weights = _token_weights(key_padding_mask, denom)
        count = -weights.sum(dim=-2, keepdim=True).clamp_min(1.0)
        sum_grad = (grad_q.sum(dim=-2, keepdim=True) + grad_centred.sum(dim=-2, keepdim=True)) / count
        sum_grad_q = (grad_q * q_folded).sum(dim=-2, keepdim=True) * (2.0 / count)
        stats_term = torch.addcmul(sum_grad, centred, sum_grad_q) * weights
        return grad_q.to(q_dtype), (grad_centred + stats_term).to(k_dtype), None, None


def bn_fold_queries(
    q: Tensor, k: Tensor, key_padding_mask: Tensor | None = None, eps: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """Attention-BN for the softmax kernel (SPEC.md §2): returns ``((q - mu) / s^2, k - mu)``,
    whose softmax attention equals that of :func:`bn_normalize` (the same logits ``q^.k^``).

    One scaling instead of two: fewer operations per step. In float16 it normalises both
    instead (:func:`bn_normalize`): there ``(q - mu) / s^2`` overflows float16's range (65504)
    when a head's keys have (almost) no variance, e.g. an SH head pooled to one key, while
    ``(q - mu) / s`` stays below ``|q - mu| / sqrt(eps)``.
    """
    if computes_in_float16(q):
        return bn_normalize(q, k, key_padding_mask, eps)
    # float(eps): a plain constant for the Function even under torch.compile(dynamic=True), which
    # makes the config's float a symbol that a second head group's Function failed to lift
    return _BNFoldQueries.apply(q, k, key_padding_mask, float(eps))


def bn_normalize(
    q: Tensor, k: Tensor, key_padding_mask: Tensor | None = None, eps: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """Attention-BN input transform (SPEC.md §2): ``(x - mu) / s`` with the keys' statistics.

    ``mu`` and ``s^2 = var + eps`` are the masked per-sample, per-head, per-feature moments of
    the keys (the SVR's training inputs); both queries and keys are normalised with them, as a
    BN layer normalises test inputs with training statistics. The linear kernel's transform
    (its feature map is not shift-invariant); the softmax kernel folds BN into the queries
    (:func:`bn_fold_queries`).
    """
    return _BNNormalize.apply(q, k, key_padding_mask, float(eps))  # float: see bn_fold_queries


def pool_tokens(
    x: Tensor,
    scale: int,
    key_padding_mask: Tensor | None = None,
    *,
    grid_size: tuple[int, int] | None = None,
    num_prefix_tokens: int = 0,
) -> tuple[Tensor, Tensor | None]:
    """Masked average pooling along the token axis (SPEC.md §2, Attention-SH).

    ``x`` is ``(B, ..., N, D)``. Window = stride = ``scale``; the last window may be partial
    (ceil mode) and averages the tokens it holds. With ``grid_size=(Hg, Wg)`` the non-prefix
    tokens form a row-major grid and the pooling is 2-D. The first ``num_prefix_tokens``
    tokens are never pooled. With a padding mask a window averages its valid tokens only, and a
    window without any valid token is marked as padding in the returned mask. Without a mask
    the pooling is one ``avg_pool2d`` (:func:`_window_pool`).

    Returns ``(pooled, pooled_mask)``; ``pooled_mask`` is None when ``key_padding_mask`` is.
    """
    scale = check_positive_int("scale", scale)
    num_tokens = x.shape[-2]
    grid = check_grid(grid_size, num_tokens, num_prefix_tokens)
    if scale == 1:
        return x, key_padding_mask
    # one split, not two slices: its backward is one concatenation, not two zero-filled copies
    prefix, body = (x.split((num_prefix_tokens, num_tokens - num_prefix_tokens), dim=-2)
                    if num_prefix_tokens else (None, x))
    shape = (num_tokens - num_prefix_tokens,) if grid is None else grid
    pooled_mask = None
    if key_padding_mask is None:
        pooled = _window_pool(body, shape, scale)
    else:
        weights = _token_weights(key_padding_mask[:, num_prefix_tokens:], body)
        counts = _window_pool(weights, shape, scale, sums=True)
        pooled = _window_pool(body * weights, shape, scale, sums=True) / counts.clamp_min(1.0)
        # counts: (B, 1.., M, 1) -> (B, M); a window with no valid token is padding
        pooled_mask = counts.flatten(1) == 0
        if num_prefix_tokens:
            pooled_mask = torch.cat([key_padding_mask[:, :num_prefix_tokens], pooled_mask], dim=1)
    if num_prefix_tokens:
        pooled = torch.cat([prefix, pooled], dim=-2)
    return pooled, pooled_mask


def _window_count(shape: Sequence[int], scale: int) -> int:
    """Pooled tokens of a 1-D sequence or 2-D grid ``shape`` at ``scale`` (ceil mode)."""
    return math.prod([-(-side // scale) for side in shape])


def _window_pool(x: Tensor, shape: tuple[int, ...], scale: int, *, sums: bool = False) -> Tensor:
    """``(..., prod(shape), D)`` -> ``(..., windows, D)``: the mean (or, with ``sums``, the sum)
    of each window of ``scale`` tokens (``scale x scale`` on a 2-D grid), row-major; a last partial
    window averages the tokens it holds (ceil mode).

    One ``avg_pool2d`` over a channels-last view of the tokens (the features as channels): on
    the CPU a mean over the window axes of a strided view was 17-40x slower (forward; issue 13).
    """
    if x.numel() == 0:  # an empty batch or sequence: (-1, ...) is ambiguous, and so is the pool
        return x[..., :_window_count(shape, scale), :]
    rows, cols = (1, shape[0]) if len(shape) == 1 else shape
    kernel = (1, scale) if len(shape) == 1 else (scale, scale)
    image = x.reshape(-1, rows, cols, x.shape[-1]).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(image, kernel, ceil_mode=True, divisor_override=1 if sums else None)
    return pooled.permute(0, 2, 3, 1).reshape(*x.shape[:-2], -1, x.shape[-1])


def pooling_matrix(
    num_tokens: int,
    scale: int,
    key_padding_mask: Tensor | None = None,
    *,
    grid_size: tuple[int, int] | None = None,
    num_prefix_tokens: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor:
    """The linear map of :func:`pool_tokens` as a ``(B or 1, M, N)`` matrix (SPEC.md §3).

    Row ``m`` holds the averaging weights of pooled token ``m``. Multiplying a pooled head's
    attention map ``(.., N_q, M)`` by it spreads each pooled key's weight equally over the
    valid tokens of its window, so rows still sum to 1.
    """
    batch = 1 if key_padding_mask is None else key_padding_mask.shape[0]
    eye = torch.eye(num_tokens, dtype=dtype, device=device).expand(batch, num_tokens, num_tokens)
    pooled, _ = pool_tokens(eye, scale, key_padding_mask, grid_size=grid_size,
                            num_prefix_tokens=num_prefix_tokens)
    return pooled


# --------------------------------------------------------------------------------------------
# kernels (SPEC.md §1): a table name -> feature map / fused path / math path
# --------------------------------------------------------------------------------------------


class _EluPlusOne(torch.autograd.Function):
    """``Phi(x) = exp(min(x, 0) - shift) + max(x, 0)`` with ``shift`` 0 (None) or, for queries,
    ``min(max_d x, 0)``, held constant (:func:`query_feature_map`); ``Phi'(x) = exp(min(x, 0) -
    shift)``; in ``x``'s dtype (CUDA autocast would run ``exp`` in float32). The backward is
    differentiable again (``create_graph``), as ``elu``'s is."""

    @staticmethod
    def forward(ctx, x: Tensor, shift: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, shift)
        negative = x.clamp_max(0.0) if shift is None else x.clamp_max(0.0) - shift
        return (torch.exp(negative) + x.clamp_min(0.0)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        x, shift = ctx.saved_tensors
        negative = x.clamp_max(0.0) if shift is None else x.clamp_max(0.0) - shift
        return grad * torch.exp(negative).to(grad.dtype), None


def elu_feature_map(x: Tensor) -> Tensor:
    """Finite feature map of the linear kernel, ``Phi(x) = elu(x) + 1`` (SPEC.md §1), evaluated
    as ``exp(min(x, 0)) + max(x, 0)``: the same function, on the CPU about ten times faster than
    ``elu``, whose ``expm1`` is not vectorised there (4M floats: 4.5 ms against 54 ms), and
    positive wherever ``exp`` is (``expm1(x) + 1`` rounds to 0 below x = -17 in float32)."""
    return _EluPlusOne.apply(x, None)


def query_feature_map(x: Tensor) -> Tensor:
    """A query's features ``Phi(x) / Phi(m)`` with ``m = min(max_d x, 0)``: the largest is at
    least 1, so no query underflows.

    Linear attention divides ``Phi(q).sum_j Phi(k_j) v_j`` by ``Phi(q).sum_j Phi(k_j)``, so a
    query's scale cancels (SPEC.md §1), and with it that scale's gradient, which is why ``m`` is
    held constant. Unscaled, a BN-normalised query ``(q - mu) / sqrt(eps)`` against keys without
    variance (one key) easily has every feature below -104, where ``exp``, and with it output and
    normaliser, are 0 in float32: the output was 0 instead of the key's value, the gradients NaN.
    """
    return _EluPlusOne.apply(x, x.detach().amax(dim=-1, keepdim=True).clamp_max(0.0))


def visibility_mask(
    num_queries: int,
    key_padding_mask: Tensor | None,
    num_keys: int,
    window: int | None = None,
    device: torch.device | None = None,
) -> Tensor | None:
    """Bool mask, True = query i may use key j, broadcastable to ``(B, H, N_q, N_k)``.

    Combines padding (``(B, 1, 1, N_k)``, or ``(B, H, 1, N_k)`` from a per-head mask) and the
    sparse local window ``|i - j| <= w`` (``(N_q, N_k)``). Returns None when every key is visible.
    """
    visible = None
    if key_padding_mask is not None:  # (B, N_k), or (B, H, N_k) per head
        visible = (~key_padding_mask).unsqueeze(-2)
        if key_padding_mask.ndim == 2:
            visible = visible.unsqueeze(1)
    if window is not None:
        i = torch.arange(num_queries, device=device)[:, None]
        j = torch.arange(num_keys, device=device)[None, :]
        band = (i - j).abs() <= window
        visible = band if visible is None else visible & band
    return visible


def _sdpa_safe_mask(visible: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Make every row of a visibility mask non-empty for SDPA; return the rows to zero after.

    A query that sees no key (an all-padding sequence, or a padded query outside every valid
    window) must give 0, not NaN: such rows are opened for the kernel and zeroed afterwards.
    """
    if visible is None:
        return None, None
    has_key = visible.any(dim=-1, keepdim=True)
    return visible | ~has_key, has_key


def _softmax_log_kernel(x: Tensor, y: Tensor) -> Tensor:
    return x @ y.transpose(-2, -1) / math.sqrt(x.shape[-1])


def _softmax_weights(q: Tensor, k: Tensor, visible: Tensor | None) -> Tensor:
    """Explicit softmax attention matrix (rows sum to 1, or 0 with no visible key), in ``q``'s
    dtype. Logits and softmax in at least float32 (bf16/fp16 inputs, autocast), as the fused
    kernels accumulate: bf16 logits of size L carry errors of about L / 256."""
    stat = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        logits = (q.to(stat) @ k.to(stat).transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
        # rows without any visible key: avoid exp(-inf - (-inf)) = NaN
        logits = logits.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)
    weights = torch.softmax(logits, dim=-1).to(q.dtype)
    if visible is not None:
        weights = weights * visible.any(dim=-1, keepdim=True)
    return weights


def _nonzero(normaliser: Tensor) -> Tensor:
    """The linear kernel's normaliser ``Phi(q) . sum_j Phi(k_j)`` is positive whenever a key is
    visible (``Phi > 0``) and 0 when none is; 1 there makes the output 0 and its gradient 0, where a
    tiny floor would give 0 / 0 = NaN in the backward pass."""
    return normaliser + (normaliser == 0)


def _log_elu_feature_map(x: Tensor) -> Tensor:
    """``log Phi(x)`` of ``Phi = elu + 1``: ``x`` where ``x <= 0`` (``Phi = exp(x)`` there), else
    ``log1p(x)``; finite for every finite ``x``, where ``Phi`` itself underflows to 0 below -104
    (float32)."""
    return torch.where(x > 0, torch.log1p(x.clamp_min(0.0)), x)


def _linear_log_kernel(x: Tensor, y: Tensor) -> Tensor:
    """``log Phi(x).Phi(y)`` as a log-sum-exp over the features: a BN-normalised query far below
    a key of no variance has every feature underflow, and ``log(0)`` made its kernel row -inf."""
    log_x, log_y = _log_elu_feature_map(x), _log_elu_feature_map(y)
    return torch.logsumexp(log_x.unsqueeze(-2) + log_y.unsqueeze(-3), dim=-1)


def _linear_weights(q: Tensor, k: Tensor, visible: Tensor | None) -> Tensor:
    """Explicit linear-kernel attention matrix ``Phi(q_i).Phi(k_j) / sum_j Phi(q_i).Phi(k_j)``."""
    similarity = query_feature_map(q) @ elu_feature_map(k).transpose(-2, -1)
    if visible is not None:  # where, not a product: a hidden key's inf must not become NaN
        similarity = similarity.where(visible, 0.0)
    normaliser = similarity.sum(dim=-1, keepdim=True)
    return similarity / _nonzero(normaliser)


COMPILED_CPU_MATH_MAX_KEYS = 24


def _compiled_cpu_prefers_math(k: Tensor, key_padding_mask: Tensor | None) -> bool:
    """Whether compiled CPU code should take the math path for a masked call over few keys.

    Inductor fuses the explicit masked softmax into a few kernels around two batched products,
    while SDPA with a boolean mask is slow on the CPU over few keys. Compiled, forward and
    backward, the math path took 0.30-0.94 of SDPA's time at 4-24 keys both with 2 threads on a
    quiet machine and with 1 thread beside other work; at 32-64 keys 0.54-0.72 with 2 threads but
    0.97-1.39 with one, so the rule stops at 24 keys (``scripts/probe_masked_sdpa.py``,
    ``results/speed/cpu/masked_sdpa*.md``; short series such as JapaneseVowels' and SH's pooled
    heads of them). Eager math was not reliably faster with one thread (0.83-2.11), so eager mode
    keeps SDPA; without a mask Inductor turns the math path into SDPA itself (issue 13). The
    key count becomes a shape guard: data whose lengths straddle 24 compile one graph more."""
    return (torch.compiler.is_compiling() and key_padding_mask is not None and k.device.type == "cpu"
            and k.shape[-2] <= COMPILED_CPU_MATH_MAX_KEYS)


def _softmax_fused(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, window: int | None, dropout_p: float
) -> Tensor | None:
    """SDPA, or the blocked O(N * window) path for a narrow sparse window; None (the math path)
    where compiled CPU code runs that faster (:func:`_compiled_cpu_prefers_math`)."""
    if window is not None and q.shape[-2] == k.shape[-2] and 4 * window + 2 < q.shape[-2]:
        return _attend_banded_softmax(q, k, v, window, key_padding_mask, dropout_p)
    if _compiled_cpu_prefers_math(k, key_padding_mask):
        return None
    visible = visibility_mask(q.shape[-2], key_padding_mask, k.shape[-2], window, q.device)
    sdpa_mask, has_key = _sdpa_safe_mask(visible)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, dropout_p=dropout_p)
    return out if has_key is None else out * has_key


def _linear_fused(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, window: int | None, dropout_p: float
) -> Tensor | None:
    """Primal O(N) form of linear attention: ``W = sum_j v_j Phi(k_j)^T`` first (SPEC.md §1).

    None (use the math path) with a sparse window or weight dropout, which need the matrix.
    """
    if window is not None or dropout_p > 0.0:
        return None
    phi_q, phi_k = query_feature_map(q), elu_feature_map(k)
    if key_padding_mask is not None:
        phi_k = phi_k * _token_weights(key_padding_mask, phi_k)
    kv = phi_k.transpose(-2, -1) @ v  # (B, H, D, Dv): the primal weights W^T
    z = phi_k.sum(dim=-2, keepdim=True)  # (B, H, 1, D)
    normaliser = (phi_q * z).sum(dim=-1, keepdim=True)
    return (phi_q @ kv) / _nonzero(normaliser)


@dataclass(frozen=True)
class Kernel:
    """One attention kernel (SPEC.md §1) and its three faces.

    ``feature_map``: the finite ``Phi`` with ``kappa(x, y) = Phi(x).Phi(y)`` (None when Phi is
    infinite, as for softmax: then there is no exact O(N) primal form). ``bn(q, k, mask, eps)``:
    Attention-BN's input transform for this kernel. ``log_kernel(x, y)``:
    ``log kappa`` for every pair (the explicit SVR expansions of :mod:`.primal`). ``weights(q, k,
    visible)``: the explicit attention matrix (the math path). ``fused(q, k, v, mask, window,
    dropout_p)``: the fast path, or None where it does not apply.
    """

    name: str
    feature_map: Callable[[Tensor], Tensor] | None
    log_kernel: Callable[[Tensor, Tensor], Tensor]
    weights: Callable[[Tensor, Tensor, Tensor | None], Tensor]
    fused: Callable[..., Tensor | None]
    bn: Callable[[Tensor, Tensor, Tensor | None, float], tuple[Tensor, Tensor]]

    @property
    def has_primal(self) -> bool:
        """Whether the kernel's primal form is exact and finite (its fused path is O(N))."""
        return self.feature_map is not None


KERNELS: dict[str, Kernel] = {
    kernel.name: kernel
    for kernel in (
        Kernel("softmax", None, _softmax_log_kernel, _softmax_weights, _softmax_fused, bn_fold_queries),
        Kernel("linear", elu_feature_map, _linear_log_kernel, _linear_weights, _linear_fused, bn_normalize),
    )
}


def get_kernel(name: str) -> Kernel:
    """The kernel called ``name``; an unknown name is an error naming the valid ones."""
    try:
        return KERNELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"kernel must be one of {list(KERNELS)}, got {name!r}") from None


def _attend_banded_softmax(
    q: Tensor, k: Tensor, v: Tensor, window: int, key_padding_mask: Tensor | None, dropout_p: float
) -> Tensor:
    """Sparse local softmax attention in O(N * window): queries in blocks, each against the
    ``block + 2 * window`` keys around it, with the blocks stacked on the batch axis so one
    fused call (with a mask broadcast over heads) covers them all."""
    batch, heads, length, dim = q.shape
    # not min(length, ...): under torch.compile that made each length up to 32 its own graph
    block = max(32, window)
    blocks = math.ceil(length / block)
    tail = blocks * block - length
    span = block + 2 * window

    def query_blocks(x: Tensor) -> Tensor:  # (B * blocks, H, block, D)
        x = F.pad(x, (0, 0, 0, tail)).unflatten(2, (blocks, block))
        return x.transpose(1, 2).reshape(batch * blocks, heads, block, dim)

    def key_blocks(x: Tensor) -> Tensor:  # (B * blocks, H, span, D), window padding on both sides
        x = F.pad(x, (0, 0, window, window + tail)).unfold(2, span, block)  # (B, H, blocks, D, span)
        return x.permute(0, 2, 1, 4, 3).reshape(batch * blocks, heads, span, x.shape[3])

    valid = (torch.ones(batch, length, dtype=torch.bool, device=q.device) if key_padding_mask is None
             else ~key_padding_mask)
    valid = F.pad(valid, (window, window + tail)).unfold(1, span, block)  # (B, blocks, span)
    offset = torch.arange(span, device=q.device)[None, :] - torch.arange(block, device=q.device)[:, None]
    band = (offset >= 0) & (offset <= 2 * window)  # key c of a block is within the window of query a
    visible = (band & valid[:, :, None, :]).reshape(batch * blocks, 1, block, span)
    sdpa_mask, has_key = _sdpa_safe_mask(visible)
    out = F.scaled_dot_product_attention(query_blocks(q), key_blocks(k), key_blocks(v),
                                         attn_mask=sdpa_mask, dropout_p=dropout_p) * has_key
    out = out.unflatten(0, (batch, blocks)).transpose(1, 2)  # (B, H, blocks, block, Dv)
    return out.flatten(2, 3)[:, :, :length]


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    options: AttentionOptions,
    *,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """One SVR per head on a shared training set: the kernel step of :func:`attention`.

    ``k, v`` may be shorter than ``q`` (pooled keys of an SH head group); ``key_padding_mask``
    is then the ``(B, M)`` mask of the keys. Inputs are assumed validated. Returns
    ``(out, weights)``; ``weights`` is ``(B, H, N, M)`` when ``need_weights`` else None.
    """
    kernel = get_kernel(options.kernel)
    if kernel.has_primal and computes_in_float16(q):
        # the sums Phi(q).z grow with the number of keys (past float16's 65504 near 700 keys at
        # head dim 64: outputs 0), and with BN Phi(q^) grows as |q - mu| / sqrt(eps) where a key
        # feature has no variance; unlike softmax such a kernel is not shift-invariant
        with torch.autocast(q.device.type, enabled=False):
            out, weights = attend(q.float(), k.float(), v.float(), options, key_padding_mask=key_padding_mask,
                                  dropout_p=dropout_p, need_weights=need_weights)
        return out.to(q.dtype), None if weights is None else weights.to(q.dtype)
    if options.bn:
        q, k = kernel.bn(q, k, key_padding_mask, options.eps)
    if options.fused and not need_weights:
        out = kernel.fused(q, k, v, key_padding_mask, options.window, dropout_p)
        if out is not None:
            return out, None
    visible = visibility_mask(q.shape[-2], key_padding_mask, k.shape[-2], options.window, q.device)
    weights = kernel.weights(q, k, visible)
    attn = F.dropout(weights, dropout_p) if dropout_p > 0.0 else weights
    return attn @ v, (attn if need_weights else None)  # the maps used: after dropout, as torch's MHA


# --------------------------------------------------------------------------------------------
# multi-scale heads (Attention-SH)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadGroup:
    """Heads that share one SH scale and so one pooled training set (one fused call)."""

    scale: int
    heads: slice | Tensor  # a slice when the heads are contiguous, else an index tensor

    def select(self, x: Tensor, dim: int = 1) -> Tensor:
        """The group's heads of ``x`` along ``dim``."""
        if isinstance(self.heads, slice):
            return x[(slice(None),) * dim + (self.heads,)]
        return x.index_select(dim, self.heads.to(x.device))


def head_groups(head_scales: Sequence[int] | None, num_heads: int) -> list[HeadGroup]:
    """Group heads by SH scale, in order of first appearance (SPEC.md §2)."""
    if head_scales is None:
        return [HeadGroup(1, slice(0, num_heads))]
    order: dict[int, list[int]] = {}
    for head, scale in enumerate(head_scales):
        order.setdefault(scale, []).append(head)
    groups = []
    for scale, heads in order.items():
        contiguous = heads == list(range(heads[0], heads[-1] + 1))
        index = slice(heads[0], heads[-1] + 1) if contiguous else torch.tensor(heads)
        groups.append(HeadGroup(scale, index))
    return groups


MIN_POOLED_GRID_SIDE = 4


def default_head_scales(num_heads: int, grid_size: tuple[int, int] | None = None) -> tuple[int, ...]:
    """Default SH scales: up to four near-equal head groups with scales 1, 2, 4, 8.

    8 heads -> (1, 1, 2, 2, 4, 4, 8, 8); 3 heads -> (1, 2, 4); 6 heads -> (1, 1, 2, 2, 4, 8).
    On a 2-D grid a scale ``s`` pools ``s x s`` tokens, so scales stop where the pooled grid
    would have fewer than ``MIN_POOLED_GRID_SIDE`` tokens per side: on CIFAR's 8x8 patches a
    scale of 8 would leave one pooled key (plus the class token), and Attention-BN's key
    statistics over two keys are degenerate (each coordinate normalises to +-1 and the queries
    are divided by half the gap between the two keys). 4 heads on 8x8 -> (1, 1, 2, 2).
    """
    num_heads = check_positive_int("num_heads", num_heads)
    levels = 4
    if grid_size is not None:
        side = min(grid_size)
        levels = 1
        while levels < 4 and math.ceil(side / 2**levels) >= MIN_POOLED_GRID_SIDE:
            levels += 1
    num_groups = min(levels, num_heads)
    base, extra = divmod(num_heads, num_groups)
    scales: list[int] = []
    for group in range(num_groups):
        scales += [2**group] * (base + (1 if group < extra else 0))
    return tuple(scales)


KeyValueFn = Callable[[int, HeadGroup], tuple[Tensor, Tensor, Tensor | None]]


def _tiles_in_order(groups: Sequence[HeadGroup]) -> bool:
    """True when the groups are contiguous head ranges that follow each other."""
    # equal lengths, strict: torch 2.5's Dynamo took strict=False for strict and broke the graph
    return all(isinstance(g.heads, slice) for g in groups) and all(
        a.heads.stop == b.heads.start for a, b in zip(groups[:-1], groups[1:], strict=True))


def split_heads(x: Tensor, groups: Sequence[HeadGroup], dim: int = 1) -> list[Tensor]:
    """``x`` cut along its head axis ``dim`` into the heads of each group.

    Uses ``torch.split`` when the groups tile the heads in order: its backward concatenates
    the gradients once, where per-group slicing would fill a full-size zero tensor per group.
    """
    if len(groups) == 1 and isinstance(groups[0].heads, slice):
        return [x]
    if _tiles_in_order(groups):
        return list(x.split([g.heads.stop - g.heads.start for g in groups], dim=dim))
    return [g.select(x, dim) for g in groups]


def grouped_attention(
    q: Tensor,
    groups: Sequence[HeadGroup],
    keys_values: KeyValueFn,
    options: AttentionOptions,
    *,
    key_padding_mask: Tensor | None = None,
    num_keys: int | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Run :func:`attend` once per head group and put the heads back in order.

    ``keys_values(i, group)`` returns group i's (pooled) ``k, v`` and their padding mask, so
    each caller pools in its own layout (:func:`attention` keys and values apart, the module both
    in one call).
    With ``need_weights`` pooled maps are spread back to ``num_keys`` keys (SPEC.md §3).
    """
    num_heads = q.shape[1]
    num_keys = q.shape[2] if num_keys is None else num_keys
    outputs, maps = [], []
    for index, (group, q_g) in enumerate(zip(groups, split_heads(q, groups), strict=True)):
        k_g, v_g, mask_g = keys_values(index, group)
        out, weights = attend(q_g, k_g, v_g, options, key_padding_mask=mask_g, dropout_p=dropout_p,
                              need_weights=need_weights)
        outputs.append(out)
        if need_weights and group.scale > 1:
            spread = pooling_matrix(num_keys, group.scale, key_padding_mask, grid_size=options.grid_size,
                                    num_prefix_tokens=options.num_prefix_tokens, dtype=weights.dtype,
                                    device=weights.device)
            weights = weights @ spread[:, None]
        maps.append(weights)
    out = merge_heads(outputs, groups, num_heads)
    return out, (merge_heads(maps, groups, num_heads) if need_weights else None)


def merge_heads(parts: list[Tensor], groups: Sequence[HeadGroup], num_heads: int) -> Tensor:
    """Per-group ``(B, h_g, ...)`` tensors back in head order ``(B, H, ...)``, decided from the
    groups' Python head indices (no data-dependent test: one graph under ``torch.compile``)."""
    if len(parts) == 1:
        return parts[0]
    if _tiles_in_order(groups):
        return torch.cat(parts, dim=1)
    first = parts[0]
    merged = first.new_empty((first.shape[0], num_heads) + tuple(first.shape[2:]))
    for group, part in zip(groups, parts, strict=True):
        index = group.heads
        if isinstance(index, slice):
            index = torch.arange(index.start, index.stop)
        merged = merged.index_copy(1, index.to(merged.device), part)
    return merged


PACKED_SH_MAX_TOKENS = 256


def packs_heads(options: AttentionOptions, num_tokens: int, key_padding_mask: Tensor | None) -> bool:
    """Whether Attention-SH runs packed (:func:`packed_attention`, one call for every head)
    rather than grouped (one call per distinct scale). Packing pools every head with one
    matrix product and pads each head's pooled keys to the longest head's, so it trades FLOPs
    (O(H N^2 D) for the pooling) for operations. Measured on the CPU (``results/speed/cpu``) it
    pays in eager mode with a padding mask, where grouped pooling takes about 20 operations per
    group, in short sequences; unpadded, grouped pooling is one ``avg_pool2d`` per group, and
    compiled code fuses it, where the packed product and the masked kernel were slower (issue 13). The
    ``pack_heads`` option overrides this rule (e.g. to measure packing on another device)."""
    scales = options.head_scales
    if scales is None or len(set(scales)) == 1 or options.pack_heads is False:
        return False
    if options.pack_heads:
        return True
    return (key_padding_mask is not None and num_tokens <= PACKED_SH_MAX_TOKENS
            and not torch.compiler.is_compiling())


def _window_index(
    num_tokens: int, scale: int, grid: tuple[int, int] | None, num_prefix_tokens: int
) -> Tensor:
    """``(N,)``: the pooled key each token falls in at SH ``scale``, in :func:`pool_tokens`' order
    (prefix tokens first and unpooled, then the windows, row-major on a grid)."""
    token = torch.arange(num_tokens)
    body = (token - num_prefix_tokens).clamp_min(0)
    if grid is None:
        window = body // scale
    else:
        window = (body // grid[1] // scale) * -(-grid[1] // scale) + body % grid[1] // scale
    return torch.where(token < num_prefix_tokens, token, num_prefix_tokens + window)


def _pooled_length(num_tokens: int, scale: int, grid: tuple[int, int] | None, num_prefix_tokens: int) -> int:
    shape = (num_tokens - num_prefix_tokens,) if grid is None else grid
    return num_prefix_tokens + _window_count(shape, scale)


@functools.lru_cache(maxsize=64)
def _head_windows(
    num_tokens: int, head_scales: tuple[int, ...], grid: tuple[int, int] | None, num_prefix_tokens: int,
    device: torch.device,
) -> Tensor:
    """``(H, L, N)`` bool: token n belongs to pooled key l of head h (L: the longest head's)."""
    length = max([_pooled_length(num_tokens, scale, grid, num_prefix_tokens) for scale in head_scales])
    index = torch.stack([_window_index(num_tokens, scale, grid, num_prefix_tokens) for scale in head_scales])
    return (index[:, None, :] == torch.arange(length)[None, :, None]).to(device)


def head_pooling(
    num_tokens: int, options: AttentionOptions, key_padding_mask: Tensor | None = None, *,
    dtype: torch.dtype = torch.float32, device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention-SH pooling of every head as one matrix (SPEC.md §2): ``(B or 1, H, L, N)``
    averaging weights (row l of head h averages the valid tokens of its window l; rows past a
    head's last window are 0) and the ``(B or 1, H, L)`` padding mask of the pooled keys
    (True for those rows and for windows without a valid token). ``pooling @ k`` gives every
    head's pooled keys, padded to the longest head's L; multiplying a map over pooled keys by it
    spreads the weights back to tokens (SPEC.md §3). The window membership is a constant, built
    once per shape in eager mode."""
    grid = options.check_input(len(options.head_scales), num_tokens)
    if device is None:
        device = torch.device("cpu") if key_padding_mask is None else key_padding_mask.device
    device = torch.device(device)
    key = (num_tokens, options.head_scales, grid, options.num_prefix_tokens, device)
    if torch.compiler.is_compiling():
        members = _head_windows.__wrapped__(*key)
    else:
        with torch.inference_mode(False):  # a cached constant must be usable by autograd later
            members = _head_windows(*key)
    members = members[None] if key_padding_mask is None else members & ~key_padding_mask[:, None, None, :]
    weights = members.to(dtype)
    counts = weights.sum(-1)
    return weights / counts.clamp_min(1.0)[..., None], counts == 0


def packed_attention(
    q: Tensor,
    kv: Tensor,
    options: AttentionOptions,
    *,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Attention-SH with every head in one call: ``kv`` ``(B, 2, H, N, D)`` (keys and values
    side by side) pooled for all heads by one product with :func:`head_pooling`'s matrix, then
    one :func:`attend` whose per-head padding mask hides the rows a head does not have. Equal
    to :func:`grouped_attention` (the tests check it); :func:`packs_heads` says when it is used.
    With ``pack_heads="flex"`` the call is :func:`flex_packed_attention` unless the math path,
    maps or weight dropout are asked for (FlexAttention gives none of them)."""
    if options.pack_heads == "flex" and options.fused and not need_weights and dropout_p == 0.0:
        return flex_packed_attention(q, kv, options, key_padding_mask=key_padding_mask), None
    pooling, pooled_mask = head_pooling(kv.shape[3], options, key_padding_mask, dtype=kv.dtype,
                                        device=kv.device)
    with torch.autocast(kv.device.type, enabled=False):  # pool in kv's dtype, as pool_tokens does
        k, v = (pooling[:, None] @ kv).unbind(1)
    out, weights = attend(q, k, v, options, key_padding_mask=pooled_mask, dropout_p=dropout_p,
                          need_weights=need_weights)
    return out, (weights @ pooling if need_weights else None)


FLEX_BLOCK = 128  # FlexAttention's default block of queries and keys
FLEX_MIN_HEAD_DIM = 16  # the smallest head dimension FlexAttention's GPU kernels take


@functools.cache
def _flex_block_tables_available() -> bool:
    """Whether this torch builds FlexAttention masks from block tables for any sequence length."""
    import inspect

    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError:
        return False
    return "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters


def _flex_attention() -> Callable[..., Tensor]:
    """FlexAttention, through ``torch.compile`` when called eagerly (its uncompiled form is a
    slow reference); inside a compiled model the outer graph compiles it."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention if torch.compiler.is_compiling() else _compiled(flex_attention)


@functools.cache
def _compiled(function: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``torch.compile(function)``, made once per function."""
    return torch.compile(function)


def _key_block_mask(hidden: Tensor, batch: int, num_queries: int) -> BlockMask:
    """FlexAttention mask of the keys ``hidden`` ``(B or 1, H, L)`` (True: not a key of that
    sample and head), the same for every query. Key blocks without a visible key are skipped and
    blocks of visible keys only run unmasked; built from the block tables directly, in tensor
    operations that compile (no ``create_block_mask`` pass over every query-key pair)."""
    from torch.nn.attention.flex_attention import BlockMask

    length = hidden.shape[-1]
    key_blocks, query_blocks = -(-length // FLEX_BLOCK), -(-num_queries // FLEX_BLOCK)
    hidden = F.pad(hidden, (0, key_blocks * FLEX_BLOCK - length), value=True)
    hidden = hidden.expand(batch, -1, -1).contiguous()  # the mask is read at every sample's index
    visible = ~hidden.unflatten(-1, (key_blocks, FLEX_BLOCK))
    every, some = visible.all(-1), visible.any(-1)

    def block_table(selected: Tensor) -> tuple[Tensor, Tensor]:
        """Per query block: how many key blocks are selected, and their indices listed first."""
        count = selected.sum(-1, dtype=torch.int32)[:, :, None].expand(-1, -1, query_blocks)
        order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return count.contiguous(), order[:, :, None].expand(-1, -1, query_blocks, -1).contiguous()

    def key_visible(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return ~hidden[b, h, kv_idx]

    return BlockMask.from_kv_blocks(*block_table(some & ~every), *block_table(every), BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=key_visible, seq_lengths=(num_queries, length))


def flex_packed_attention(
    q: Tensor, kv: Tensor, options: AttentionOptions, *, key_padding_mask: Tensor | None = None
) -> Tensor:
    """Attention-SH (softmax kernel, optionally BN) with every head in one FlexAttention call.

    Each head group pools its keys and values as :func:`grouped_attention` does
    (:func:`pool_tokens`); they are padded to the longest group's and put back in head order, and
    the block mask hides each head's padding (SPEC.md §2), so a head at scale s computes about
    1/s (1/s^2 on a 2-D grid) of the key blocks (``FLEX_BLOCK`` keys each) of a scale-1 head.
    Heads need ``FLEX_MIN_HEAD_DIM`` features or more. ``kv`` is
    ``(B, 2, H, N, D)``; returns ``(B, H, N, D)``. Trains, and compiles into a model, on CUDA only
    (torch's FlexAttention has no CPU backward, and inductor's CPU template cannot read the mask
    built in the same graph): on other devices those calls are errors.
    """
    gradients = torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad)
    options.check_device(q.device, gradients=gradients)
    if q.shape[-1] < FLEX_MIN_HEAD_DIM:
        raise ValueError(f"pack_heads='flex' needs a head dimension of at least {FLEX_MIN_HEAD_DIM} "
                         f"(FlexAttention's GPU kernels), got {q.shape[-1]}")
    if q.device.type != "cuda" and torch.compiler.is_compiling():
        raise ValueError(f"pack_heads='flex' compiles into a model on CUDA only (inductor's "
                         f"{q.device.type} FlexAttention cannot read a mask made in the same graph); "
                         "call the model uncompiled there (FlexAttention itself is still compiled)")
    batch, _, num_heads, num_tokens, _ = kv.shape
    grid = options.check_input(num_heads, num_tokens)
    groups = head_groups(options.head_scales, num_heads)
    pool = dict(grid_size=grid, num_prefix_tokens=options.num_prefix_tokens)
    pooled = [pool_tokens(kv_g, g.scale, key_padding_mask, **pool)
              for g, kv_g in zip(groups, split_heads(kv, groups, dim=2), strict=True)]
    length = max([kv_g.shape[-2] for kv_g, _ in pooled])
    kv_parts, hidden_parts = [], []
    for kv_g, mask_g in pooled:
        extra, heads_g = length - kv_g.shape[-2], kv_g.shape[2]
        kv_parts.append(F.pad(kv_g, (0, 0, 0, extra)).transpose(1, 2))  # (B, Hg, 2, L, D)
        hidden_g = (torch.arange(length, device=kv.device) >= kv_g.shape[-2])[None] if mask_g is None else (
            F.pad(mask_g, (0, extra), value=True))
        hidden_parts.append(hidden_g[:, None].expand(-1, heads_g, -1))  # (B or 1, Hg, L)
    k, v = merge_heads(kv_parts, groups, num_heads).unbind(2)
    hidden = merge_heads(hidden_parts, groups, num_heads)
    if options.bn:
        q, k = get_kernel("softmax").bn(q, k, hidden, options.eps)
    block_mask = _key_block_mask(hidden, batch, q.shape[-2])
    return _flex_attention()(q, k, v, block_mask=block_mask)


# --------------------------------------------------------------------------------------------
# the public entry point
# --------------------------------------------------------------------------------------------


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    options: AttentionOptions | None = None,
    *,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    **switches: object,
) -> Tensor | tuple[Tensor, Tensor]:
    """Primal-dual attention (SPEC.md §2): softmax/linear kernel x BN x SH x sparse window.

    Args:
        q, k, v: ``(B, H, N, D)`` projected queries, keys and values (``v`` may differ in D).
        options: the switches as one :class:`AttentionOptions`; or give them as keywords
            (``kernel="linear", bn=True, head_scales=..., window=..., grid_size=...,
            num_prefix_tokens=..., eps=..., fused=..., causal=..., pack_heads=...``), which
            override ``options``' fields. With ``causal`` (SPEC.md §2 "Causal") ``q`` may be
            shorter than ``k``: its queries are the last positions (decoding with a cache of the
            earlier keys).
        key_padding_mask: ``(B, N)`` bool, True marks padding.
        dropout_p: dropout on the attention weights (pass 0.0 in eval mode).
        need_weights: also return the ``(B, H, N, N)`` attention maps (pooled heads spread back).

    Returns:
        ``(B, H, N, Dv)``, or ``(out, weights)`` when ``need_weights``.
    """
    options = with_switches(options, switches)
    q, k, v = _autocast_inputs(q, k, v)
    _check_qkv(q, k, v)
    batch, num_heads, num_keys = k.shape[0], k.shape[1], k.shape[2]
    if options.head_scales is None:  # an SH config without scales takes its defaults, as layers do
        options = options.for_heads(num_heads)
    key_padding_mask = check_key_padding_mask(key_padding_mask, batch, num_keys)
    if options.causal:  # which sets padded keys and values to zero as below
        from primal_dual_attention.causal import causal_attention

        return causal_attention(q, k, v, options, key_padding_mask=key_padding_mask,
                                dropout_p=dropout_p, need_weights=need_weights)
    k, v = zero_padding(key_padding_mask, k, v)
    grid = options.check_input(num_heads, num_keys)
    check_probability("dropout_p", dropout_p)
    if options.window is not None and q.shape[-2] != num_keys:
        raise ValueError(f"window={options.window} (sparse attention, |i - j| <= window) needs the queries "
                         f"at the keys' positions, got {q.shape[-2]} queries for {num_keys} keys "
                         "(cross-attention has no shared positions)")

    # packing pools keys and values side by side, (B, 2, H, N, D): one head size for both
    if k.shape[-1] == v.shape[-1] and packs_heads(options, num_keys, key_padding_mask):
        out, weights = packed_attention(q, torch.stack((k, v), 1), options, key_padding_mask=key_padding_mask,
                                        dropout_p=dropout_p, need_weights=need_weights)
        return (out, weights) if need_weights else out
    groups = head_groups(options.head_scales, num_heads)
    k_parts, v_parts = split_heads(k, groups), split_heads(v, groups)

    def pooled_keys_values(index: int, group: HeadGroup) -> tuple[Tensor, Tensor, Tensor | None]:
        k_g, v_g = k_parts[index], v_parts[index]
        if group.scale == 1:
            return k_g, v_g, key_padding_mask
        pool = dict(grid_size=grid, num_prefix_tokens=options.num_prefix_tokens)
        k_p, mask_p = pool_tokens(k_g, group.scale, key_padding_mask, **pool)
        v_p, _ = pool_tokens(v_g, group.scale, key_padding_mask, **pool)
        return k_p, v_p, mask_p

    out, weights = grouped_attention(
        q, groups, pooled_keys_values, options, key_padding_mask=key_padding_mask,
        num_keys=num_keys, dropout_p=dropout_p, need_weights=need_weights)
    return (out, weights) if need_weights else out


def with_switches(options: AttentionOptions | None, switches: dict[str, object]) -> AttentionOptions:
    """``options`` (defaults when None; an :class:`~.attention.AttentionConfig` stays one) with the
    named switches replaced; unknown names are an error listing the valid ones."""
    if options is not None and not isinstance(options, AttentionOptions):
        raise TypeError(f"options must be an AttentionOptions or None, got {type(options).__name__}")
    check_option_names(AttentionOptions if options is None else type(options), switches)
    if options is None:
        return AttentionOptions(**switches)
    return replace(options, **switches) if switches else options
