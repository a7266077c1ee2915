"""The standard PyTorch Long Range Arena encoder with any primal-dual attention (issue 8).

Token embedding + learned positional embedding, ``depth`` pre-norm encoder blocks (dim 64,
2 heads, FFN 128, 2 layers in the LRA set-up), a masked mean over the valid tokens and a
two-layer ReLU classifier head. The token embedding keeps PyTorch's default N(0, 1)
initialisation (Nystromformer's port draws it from N(0, 0.02); on shorter ListOps expressions at
lr 5e-4 both learned nearly alike, ``results/lra/probe_listops_plateau.md``). For Retrieval (``dual=True``)
both documents are encoded by the same encoder and the head sees ``[u, v, u * v, u - v]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from primal_dual_attention.attention import AttentionConfig
from primal_dual_attention.functional import check_key_padding_mask, check_positive_int
from primal_dual_attention.models.encoder import TransformerEncoder


class LRAClassifier(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        max_len: int,
        *,
        dim: int = 64,
        depth: int = 2,
        num_heads: int = 2,
        mlp_dim: int = 128,
        dropout: float = 0.1,
        attention: AttentionConfig | None = None,
        dual: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("num_classes", num_classes), ("max_len", max_len)):
            check_positive_int(name, value)
        self.max_len, self.dual = max_len, dual
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.encoder = TransformerEncoder(dim, depth, num_heads, mlp_dim, norm="pre",
                                          attention=attention, dropout=dropout)
        features = 4 * dim if dual else dim
        self.head = nn.Sequential(nn.Linear(features, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, num_classes))

    def encode(self, tokens: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``(B, T)`` token ids -> ``(B, dim)`` masked mean of the encoder's outputs."""
        if not isinstance(tokens, Tensor) or tokens.ndim != 2:
            got = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be a (B, T) tensor of token ids, got {got}")
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"sequences of {tokens.shape[1]} tokens exceed max_len={self.max_len}")
        h = self.drop(self.embed(tokens) + self.pos_embed[:, : tokens.shape[1]])
        h = self.encoder(h, key_padding_mask)
        if key_padding_mask is None:
            return h.mean(1)
        valid = (~key_padding_mask).unsqueeze(-1).to(h.dtype)
        return (h * valid).sum(1) / valid.sum(1).clamp_min(1.0)

    def forward(self, tokens: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        if not self.dual:
            return self.head(self.encode(tokens, key_padding_mask))
        if tokens.ndim != 2 or tokens.shape[1] % 2:
            raise ValueError(f"a dual (two-document) model takes (B, 2 x T) tokens, the two documents "
                             f"side by side, got shape {tuple(tokens.shape)}")
        half = tokens.shape[1] // 2
        key_padding_mask = check_key_padding_mask(key_padding_mask, *tokens.shape)
        masks = (None, None) if key_padding_mask is None else key_padding_mask.split(half, dim=1)
        u = self.encode(tokens[:, :half], masks[0])
        v = self.encode(tokens[:, half:], masks[1])
        return self.head(torch.cat([u, v, u * v, u - v], dim=-1))
