"""A small decoder-only language model whose attention is any causal primal-dual variant."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from primal_dual_attention.attention import AttentionConfig, attention_config, evaluation_mode
from primal_dual_attention.causal import DecodingCache
from primal_dual_attention.functional import check_key_padding_mask
from primal_dual_attention.models.encoder import EncoderBlock


class DecoderBlock(EncoderBlock):
    """A pre-norm :class:`EncoderBlock` whose attention is causal (SPEC.md §2 "Causal"); its
    forward takes the layer's :class:`DecodingCache` while generating."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *,
                 attention: AttentionConfig | str | None = None, **block_kwargs) -> None:
        causal = replace(attention_config(attention), causal=True)
        super().__init__(dim, num_heads, mlp_dim, attention=causal, norm="pre", **block_kwargs)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None,
                cache: DecodingCache | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), key_padding_mask=key_padding_mask, cache=cache))
        return x + self.drop(self.mlp(self.norm2(x)))


class DecoderLM(nn.Module):
    """Token embedding + learned positions, ``depth`` causal pre-norm blocks, a final LayerNorm
    and an LM head tied to the embedding. ``forward(tokens)`` gives ``(B, N, vocab)`` logits of
    the next token at every position; :meth:`generate` samples with per-layer decoding caches."""

    def __init__(self, vocab_size: int, max_len: int, *, dim: int = 128, depth: int = 2,
                 num_heads: int = 4, mlp_dim: int = 256, dropout: float = 0.1,
                 attention: AttentionConfig | str | None = None) -> None:
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, dim))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            DecoderBlock(dim, num_heads, mlp_dim, attention=attention, dropout=dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    @property
    def attention(self) -> AttentionConfig:
        return self.blocks[0].attn.config

    def forward(self, tokens: Tensor, key_padding_mask: Tensor | None = None,
                caches: list[DecodingCache] | None = None) -> Tensor:
        """``tokens`` ``(B, N)``; with ``caches`` (one per block) they follow the tokens the caches
        hold. A token's position counts the valid tokens before it, so a left-padded prompt has
        the positions (and the logits) of the prompt alone."""
        return self.logits(tokens, key_padding_mask, caches)

    def logits(self, tokens: Tensor, key_padding_mask: Tensor | None = None,
               caches: list[DecodingCache] | None = None) -> Tensor:
        """``(B, N, vocab)`` next-token logits (:meth:`forward`'s, whatever a subclass returns)."""
        if not isinstance(tokens, Tensor) or tokens.ndim != 2:
            got = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be a (B, N) tensor of token ids, got {got}")
        key_padding_mask = check_key_padding_mask(key_padding_mask, *tokens.shape)  # before positions use it
        start = 0 if caches is None else caches[0].length
        before = None if caches is None else caches[0].valid_tokens
        if key_padding_mask is None and (before is None or start == 0):
            if start + tokens.shape[1] > self.max_len:
                raise ValueError(f"positions {start}..{start + tokens.shape[1] - 1} exceed "
                                 f"max_len={self.max_len}")
            positions = self.pos_embed[:, start : start + tokens.shape[1]]
        else:
            order = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
            if key_padding_mask is not None:
                valid = (~key_padding_mask).long()
                order = valid.cumsum(1) - valid
            order = order + (0 if before is None else before[:, None])
            if order.numel() and (last := int(order.max())) >= self.max_len:  # padding takes no position
                raise ValueError(f"position {last} exceeds max_len={self.max_len}")
            positions = self.pos_embed[0, order]
        x = self.drop(self.embed(tokens) + positions)
        for index, block in enumerate(self.blocks):
            x = block(x, key_padding_mask, None if caches is None else caches[index])
        return self.norm(x) @ self.embed.weight.T

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, key_padding_mask: Tensor | None = None,
                 temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """``prompt`` ``(B, T)`` (left padding marked in ``key_padding_mask``; padding after a
        prompt token is refused, as each row continues from its last position) followed by
        ``max_new_tokens`` sampled tokens; ``temperature=0`` is greedy. Each step feeds one token
        through the caches (:class:`DecodingCache`), so a step costs O(cache), not O(length)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if not 0.0 <= temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
        if (not isinstance(prompt, Tensor) or prompt.ndim != 2 or prompt.is_floating_point()
                or prompt.is_complex() or prompt.dtype == torch.bool):
            what = (f"{prompt.dtype} of shape {tuple(prompt.shape)}" if isinstance(prompt, Tensor)
                    else type(prompt).__name__)
            raise ValueError(f"prompt must be an integer tensor of token ids (B, T), got {what}")
        if prompt.shape[1] == 0:
            raise ValueError("prompt must hold at least one token per sequence (B, T >= 1), got T = 0")
        key_padding_mask = check_key_padding_mask(key_padding_mask, *prompt.shape)
        valid = prompt.shape[1]
        if key_padding_mask is not None:
            if rows := _padded_after_tokens(key_padding_mask):  # each row continues from its last position
                raise ValueError(f"key_padding_mask marks padding after a valid prompt token (rows {rows}); "
                                 "generate() continues each row from its last position, so pad prompts "
                                 "on the left")
            valid = int((~key_padding_mask).sum(1).max())
        needed = valid + max_new_tokens - 1  # positions fed: the prompt's, then every new token but the last
        if max_new_tokens and needed > self.max_len:
            raise ValueError(f"{valid} prompt tokens + max_new_tokens={max_new_tokens} need {needed} "
                             f"positions, more than max_len={self.max_len}")
        with evaluation_mode(self):
            caches = [DecodingCache() for _ in self.blocks]
            logits = self.logits(prompt, key_padding_mask, caches)[:, -1]
            tokens = [prompt]
            for step in range(max_new_tokens):
                if temperature == 0:
                    token = logits.argmax(-1, keepdim=True)
                else:
                    # shifted first: the largest logit becomes 0, so a tiny temperature cannot overflow
                    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
                    if top_k is not None:
                        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
                tokens.append(token)
                if step + 1 < max_new_tokens:
                    logits = self.logits(token, None, caches)[:, -1]
        return torch.cat(tokens, dim=1)


def _padded_after_tokens(key_padding_mask: Tensor) -> list[int]:
    """The rows of a ``(B, T)`` padding mask with a padded position after a valid token."""
    seen_token = (~key_padding_mask).long().cummax(1).values.bool()
    return torch.nonzero((key_padding_mask & seen_token).any(1)).flatten().tolist()


class NextTokenLM(DecoderLM):
    """:class:`DecoderLM` for the training engine: ``(B * N, vocab)`` logits, one row per
    predicted token (the engine's samples). Same parameters, so its checkpoints load into a
    :class:`DecoderLM` for generation."""

    def forward(self, tokens: Tensor, key_padding_mask: Tensor | None = None,
                caches: list[DecodingCache] | None = None) -> Tensor:
        return super().forward(tokens, key_padding_mask, caches).flatten(0, 1)
