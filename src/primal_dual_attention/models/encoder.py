"""A transformer encoder whose attention is any primal-dual variant."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from primal_dual_attention.attention import AttentionConfig, MultiHeadAttention

NORM_PLACEMENTS = ("pre", "post")


class EncoderBlock(nn.Module):
    """Attention + GELU feed-forward, each with dropout and a residual, pre- or post-norm.

    ``attention`` (an :class:`AttentionConfig`) is handed to the layer unchanged."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        *,
        attention: AttentionConfig | None = None,
        dropout: float = 0.1,
        attn_drop: float = 0.0,
        norm: str = "pre",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if norm not in NORM_PLACEMENTS:
            raise ValueError(f"norm must be one of {NORM_PLACEMENTS}, got {norm!r}")
        factory = {"device": device, "dtype": dtype}
        self.pre_norm = norm == "pre"
        self.attn = MultiHeadAttention(dim, num_heads, attention, attn_drop=attn_drop, **factory)
        self.norm1 = nn.LayerNorm(dim, **factory)
        self.norm2 = nn.LayerNorm(dim, **factory)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim, **factory), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(mlp_dim, dim, **factory),
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        if self.pre_norm:
            x = x + self.drop(self.attn(self.norm1(x), key_padding_mask=key_padding_mask))
            return x + self.drop(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, key_padding_mask=key_padding_mask)))
        return self.norm2(x + self.drop(self.mlp(x)))


class TransformerEncoder(nn.Module):
    """``depth`` encoder blocks and a final LayerNorm (pre-norm) over ``(B, N, dim)`` tokens."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_dim: int, *,
                 norm: str = "pre", **block_kwargs) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            EncoderBlock(dim, num_heads, mlp_dim, norm=norm, **block_kwargs) for _ in range(depth)
        )
        self.final_norm = nn.LayerNorm(dim) if norm == "pre" else nn.Identity()

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        for block in self.blocks:
            x = block(x, key_padding_mask)
        return self.final_norm(x)
