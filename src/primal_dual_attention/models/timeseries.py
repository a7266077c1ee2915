"""Encoder-only transformer classifier for multivariate time series (UEA).

The field's standard set-up: a linear embedding of each time step, a learnable positional
embedding, ``depth`` encoder blocks, GELU, dropout, and a head over the masked token
sequence: ``flatten`` (padding zeroed, the whole padded length flattened into a linear
classifier, as the common Time-Series-Library recipe does) or ``mean`` (masked mean).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from primal_dual_attention.attention import AttentionConfig
from primal_dual_attention.functional import check_key_padding_mask, check_positive_int
from primal_dual_attention.models.encoder import TransformerEncoder

POOLINGS = ("flatten", "mean")


class TimeSeriesTransformer(nn.Module):
    def __init__(
        self,
        num_channels: int,
        num_classes: int,
        max_len: int,
        *,
        dim: int = 128,
        depth: int = 3,
        num_heads: int = 8,
        mlp_dim: int = 256,
        dropout: float = 0.1,
        attention: AttentionConfig | None = None,
        norm: str = "post",
        pooling: str = "flatten",
    ) -> None:
        super().__init__()
        for name, value in (("num_channels", num_channels), ("num_classes", num_classes),
                            ("max_len", max_len)):
            check_positive_int(name, value)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.max_len, self.pooling = max_len, pooling
        self.embed = nn.Linear(num_channels, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.encoder = TransformerEncoder(dim, depth, num_heads, mlp_dim, norm=norm,
                                          attention=attention, dropout=dropout)
        features = dim * max_len if pooling == "flatten" else dim
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``x`` (B, T, C) with ``T <= max_len``; ``key_padding_mask`` (B, T), True = padding."""
        if x.ndim != 3 or x.shape[-1] != self.embed.in_features:
            raise ValueError(f"x must have shape (B, T, C={self.embed.in_features}), got {tuple(x.shape)}")
        length = x.shape[1]
        if length > self.max_len:
            raise ValueError(
                f"sequence length {length} exceeds the positional embedding's max_len "
                f"{self.max_len}; pad or cut the input, or build the model with a larger max_len")
        key_padding_mask = check_key_padding_mask(key_padding_mask, x.shape[0], length)
        if key_padding_mask is not None:  # padded steps are inert whatever they hold (NaN too), SPEC.md §2
            x = x.masked_fill(key_padding_mask[..., None], 0.0)
        h = self.drop(self.embed(x) + self.pos_embed[:, :length])
        h = F.gelu(self.encoder(h, key_padding_mask))
        h = self.drop(h)
        valid = None if key_padding_mask is None else (~key_padding_mask).unsqueeze(-1).to(h.dtype)
        if self.pooling == "mean":
            if valid is None:
                return self.head(h.mean(dim=1))
            return self.head((h * valid).sum(1) / valid.sum(1).clamp_min(1.0))
        if valid is not None:
            h = h * valid
        h = F.pad(h, (0, 0, 0, self.max_len - length))  # batches may be cut to their longest
        return self.head(h.flatten(1))
