"""The decoder LM: causal blocks, tied head, generation through the decoding caches."""

from __future__ import annotations

import pytest
import torch

from primal_dual_attention import VARIANTS, AttentionConfig
from primal_dual_attention.models.decoder import DecoderLM


def model(variant: str) -> DecoderLM:
    kwargs = {"window": 3} if VARIANTS[variant].sparse else {}
    return DecoderLM(40, 32, dim=16, depth=2, num_heads=4, mlp_dim=32,
                     attention=AttentionConfig(variant=variant, **kwargs)).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generate_with_caches_equals_recomputing(variant):
    """Greedy generation through the caches = argmax of a full causal forward at every step."""
    lm = model(variant)
    assert lm.attention.causal and lm.embed.weight is not None
    prompt = torch.randint(0, 40, (2, 5))
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, :2] = True  # left padding
    out = lm.generate(prompt, 8, key_padding_mask=pad, temperature=0)
    tokens = prompt
    for _ in range(8):
        mask = torch.cat([pad, torch.zeros(2, tokens.shape[1] - 5, dtype=torch.bool)], 1)
        tokens = torch.cat([tokens, lm(tokens, mask)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, tokens)


def test_logits_shape_tied_head_and_max_len():
    lm = model("bn_sh")
    logits = lm(torch.randint(0, 40, (3, 10)))
    assert logits.shape == (3, 10, 40)
    assert [p.shape for p in lm.parameters()].count(lm.embed.weight.shape) == 1  # the head is tied
    generator = torch.Generator().manual_seed(0)
    sampled = lm.generate(torch.randint(0, 40, (1, 2)), 4, top_k=5, generator=generator)
    assert sampled.shape == (1, 6)
    with pytest.raises(ValueError, match="max_len"):
        lm(torch.randint(0, 40, (1, 33)))
