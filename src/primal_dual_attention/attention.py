"""``MultiHeadAttention`` and the named attention variants (SPEC.md §1-§2).

The module owns the projections; the math lives in :mod:`primal_dual_attention.functional`.
A variant is a preset of three independent switches (kernel, Attention-BN, Attention-SH) plus
whether it needs a sparse window, so every combination is one entry of :data:`VARIANTS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from primal_dual_attention.functional import (
    HeadGroup,
    check_grid,
    check_head_scales,
    check_key_padding_mask,
    check_positive_int,
    default_head_scales,
    grouped_attention,
    head_groups,
    pool_tokens,
)


@dataclass(frozen=True)
class AttentionVariant:
    """A named preset: which kernel, and whether BN / SH / a sparse window are on."""

    name: str
    kernel: str
    bn: bool = False
    multi_scale: bool = False
    sparse: bool = False
    formula: str = ""


VARIANTS: dict[str, AttentionVariant] = {
    v.name: v
    for v in (
        AttentionVariant("softmax", "softmax",
                         formula="softmax(q k^T / sqrt(D)) v"),
        AttentionVariant("linear", "linear",
                         formula="Phi(q) (Phi(k)^T v) / (Phi(q) sum_j Phi(k_j)), Phi = elu + 1"),
        AttentionVariant("sparse", "softmax", sparse=True,
                         formula="softmax over keys with |i - j| <= window"),
        AttentionVariant("bn", "softmax", bn=True,
                         formula="softmax(q^ k^T^ / sqrt(D)) v, x^ = (x - mu_k) / s_k"),
        AttentionVariant("sh", "softmax", multi_scale=True,
                         formula="head h: softmax(q pool_s(k)^T / sqrt(D)) pool_s(v)"),
        AttentionVariant("bn_sh", "softmax", bn=True, multi_scale=True,
                         formula="SH, then BN with the pooled keys' statistics"),
        AttentionVariant("linear_bn", "linear", bn=True,
                         formula="linear kernel on BN-normalised q, k"),
        AttentionVariant("linear_sh", "linear", multi_scale=True,
                         formula="linear kernel on pooled k, v per head"),
        AttentionVariant("linear_bn_sh", "linear", bn=True, multi_scale=True,
                         formula="linear kernel, pooled k, v, BN with pooled statistics"),
    )
}


def variant_names(keep: Callable[[AttentionVariant], bool] = lambda variant: True) -> tuple[str, ...]:
    """Names of the variants that ``keep`` accepts, in registry order."""
    return tuple(name for name, variant in VARIANTS.items() if keep(variant))


#: The paper's four attentions: softmax, BN, SH and BN+SH (softmax kernel, no window).
PAPER_VARIANTS = variant_names(lambda v: v.kernel == "softmax" and not v.sparse)
#: The paper's four plus the baselines it compares with: linear, sparse and linear with BN.
STUDIED_VARIANTS = variant_names(lambda v: not (v.kernel == "linear" and v.multi_scale))


def get_variant(name: str) -> AttentionVariant:
    """Look up a variant by name, or raise a ``ValueError`` listing the valid names."""
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {name!r}") from None


class MultiHeadAttention(nn.Module):
    """Batch-first multi-head self-attention with every primal-dual variant (SPEC.md §2).

    ``forward(x, key_padding_mask=None, need_weights=False)`` takes ``x`` of shape
    ``(B, N, dim)`` and a ``(B, N)`` bool mask (True = padding); it returns ``(B, N, dim)``, or
    ``(out, weights)`` with ``(B, H, N, N)`` maps when ``need_weights``. For SH variants the
    layer input is pooled once per distinct scale *before* the key/value projections (exact:
    masked average pooling commutes with an affine map, SPEC.md §2), so only the pooled tokens
    are projected. The ``qkv`` / ``proj`` parameter layout matches timm and
    ``torch.nn.MultiheadAttention`` (q, k, v rows stacked).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        variant: str = "softmax",
        head_scales: Sequence[int] | None = None,
        window: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        grid_size: tuple[int, int] | None = None,
        num_prefix_tokens: int = 0,
        eps: float = 1e-5,
        fused_attn: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dim = check_positive_int("dim", dim)
        num_heads = check_positive_int("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.spec = get_variant(variant)
        if head_scales is not None and not self.spec.multi_scale:
            raise ValueError(
                f"head_scales is only used by the SH variants "
                f"{[n for n, v in VARIANTS.items() if v.multi_scale]}, got variant={variant!r}"
            )
        if self.spec.multi_scale:
            scales = default_head_scales(num_heads, grid_size) if head_scales is None else head_scales
            self.head_scales: tuple[int, ...] | None = check_head_scales(scales, num_heads)
        else:
            self.head_scales = None
        if window is not None:
            window = check_positive_int("window", window, allow_zero=True)
            if self.spec.multi_scale:
                raise ValueError(
                    f"window (sparse attention) cannot be combined with the SH variant "
                    f"{variant!r}: pooled keys have no token positions; got window={window}"
                )
        elif self.spec.sparse:
            raise ValueError("variant 'sparse' needs window=w (query i sees |i - j| <= w)")
        for name, p in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.window = window
        self.grid_size = None if grid_size is None else tuple(grid_size)
        self.num_prefix_tokens = check_positive_int(
            "num_prefix_tokens", num_prefix_tokens, allow_zero=True)
        self.eps = eps
        self.attn_drop = attn_drop
        self.fused_attn = fused_attn
        self.groups = head_groups(self.head_scales, num_heads)
        factory = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        for index, group in enumerate(self.groups):
            self.register_buffer(f"_kv_rows_{index}", self._kv_rows(group), persistent=False)

    @property
    def variant(self) -> str:
        return self.spec.name

    def _kv_rows(self, group: HeadGroup) -> Tensor:
        """Rows of ``qkv.weight`` holding the keys then values of a head group."""
        heads = torch.arange(self.num_heads)[group.heads]
        rows = (heads[:, None] * self.head_dim + torch.arange(self.head_dim)).flatten()
        return torch.cat([self.dim + rows, 2 * self.dim + rows])

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, need_weights: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, N, dim={self.dim}), got {shape}")
        batch, num_tokens, _ = x.shape
        key_padding_mask = check_key_padding_mask(key_padding_mask, batch, num_tokens)
        if self.num_prefix_tokens > num_tokens:
            raise ValueError(
                f"num_prefix_tokens={self.num_prefix_tokens} exceeds the {num_tokens} tokens")
        grid = check_grid(self.grid_size, num_tokens, self.num_prefix_tokens)
        heads, head_dim = self.num_heads, self.head_dim

        if self.head_scales is None:
            qkv = self.qkv(x).view(batch, num_tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)

            def keys_values(index: int, group: HeadGroup) -> tuple[Tensor, Tensor, Tensor | None]:
                return k, v, key_padding_mask
        else:
            weight, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(x, weight[: self.dim], None if bias is None else bias[: self.dim])
            q = q.view(batch, num_tokens, heads, head_dim).transpose(1, 2)

            def keys_values(index: int, group: HeadGroup) -> tuple[Tensor, Tensor, Tensor | None]:
                pooled, pooled_mask = pool_tokens(
                    x, group.scale, key_padding_mask, grid_size=grid,
                    num_prefix_tokens=self.num_prefix_tokens)
                rows = getattr(self, f"_kv_rows_{index}")
                kv = F.linear(pooled, weight.index_select(0, rows),
                              None if bias is None else bias.index_select(0, rows))
                kv = kv.view(batch, pooled.shape[1], 2, -1, head_dim).permute(2, 0, 3, 1, 4)
                return kv[0], kv[1], pooled_mask

        out, weights = grouped_attention(
            q, self.groups, keys_values, kernel=self.spec.kernel, bn=self.spec.bn,
            window=self.window, key_padding_mask=key_padding_mask, grid_size=grid,
            num_prefix_tokens=self.num_prefix_tokens, num_keys=num_tokens, eps=self.eps,
            dropout_p=self.attn_drop if self.training else 0.0, need_weights=need_weights,
            fused=self.fused_attn,
        )
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, num_tokens, self.dim)))
        return (out, weights) if need_weights else out

    def extra_repr(self) -> str:
        parts = [f"dim={self.dim}", f"num_heads={self.num_heads}", f"variant={self.variant!r}"]
        if self.head_scales is not None:
            parts.append(f"head_scales={self.head_scales}")
        if self.window is not None:
            parts.append(f"window={self.window}")
        if self.grid_size is not None:
            parts.append(f"grid_size={self.grid_size}, num_prefix_tokens={self.num_prefix_tokens}")
        return ", ".join(parts)
