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


@pytest.mark.parametrize("variant", ["softmax", "bn", "linear"])
def test_a_left_padded_prompt_generates_as_the_prompt_alone(variant):
    """Positions count valid tokens, so left padding changes neither the prompt's logits nor the
    tokens generated after it (SH excepted: its windows count padded positions, SPEC.md §2)."""
    lm = model(variant)
    prompt = torch.randint(1, 40, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], 1)
    pad = torch.tensor([[True] * 3 + [False] * 5])
    torch.testing.assert_close(lm(padded, pad)[:, 3:], lm(prompt), rtol=1e-5, atol=1e-5)
    alone = lm.generate(prompt, 6, temperature=0)
    assert torch.equal(lm.generate(padded, 6, key_padding_mask=pad, temperature=0)[:, 3:], alone)


@pytest.mark.parametrize("options,message", [
    ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0"),
    ({"temperature": -1.0}, "temperature must be a finite number >= 0"),
    ({"top_k": 0}, "top_k must be an integer >= 1"),
    ({"prompt": torch.randint(0, 40, (2,))}, r"prompt must be an integer tensor of token ids \(B, T\), got "
                                             r"torch.int64 of shape \(2,\)"),
    ({"prompt": torch.rand(1, 2)}, "prompt must be an integer tensor of token ids"),
])
def test_generate_refuses_bad_sampling_options(options, message):
    arguments = {"max_new_tokens": 3, "prompt": torch.randint(0, 40, (1, 2)), **options}
    with pytest.raises(ValueError, match=message):
        model("softmax").generate(arguments.pop("prompt"), arguments.pop("max_new_tokens"), **arguments)


def test_generate_refuses_padding_after_a_prompt_token_and_an_empty_prompt():
    """Each row continues from its last position: a right-padded prompt predicted from a pad."""
    lm = model("softmax")
    prompt = torch.randint(0, 40, (3, 5))
    pad = torch.tensor([[False] * 5, [True] * 2 + [False] * 3, [False] * 3 + [True] * 2])
    with pytest.raises(ValueError, match=r"padding after a valid prompt token \(rows \[2\]\)"):
        lm.generate(prompt, 2, key_padding_mask=pad)
    with pytest.raises(ValueError, match="at least one token per sequence"):
        lm.generate(prompt[:, :0], 2)


def test_logits_check_the_mask_before_positions_use_it():
    with pytest.raises(ValueError, match=r"must have shape \(B, N\) = \(1, 5\), got \(2, 5\)"):
        model("softmax").logits(torch.randint(0, 40, (1, 5)), torch.zeros(2, 5, dtype=torch.bool))


def test_a_tiny_temperature_samples_the_greedy_tokens():
    """Logits are shifted before the division, so 1e-40 stays finite: it picks the argmax."""
    lm = model("softmax")
    prompt = torch.randint(0, 40, (2, 4))
    greedy = lm.generate(prompt, 5, temperature=0)
    torch.testing.assert_close(lm.generate(prompt, 5, temperature=1e-40), greedy)


def test_generation_counts_positions_of_valid_tokens_only():
    """Twelve padding tokens take no position: 3 valid tokens and 8 new ones fit max_len 16,
    although the padded sequence is longer; the training subclass generates too."""
    from primal_dual_attention.models.decoder import NextTokenLM

    lm = DecoderLM(40, 16, dim=16, depth=1, num_heads=4, mlp_dim=32, attention="softmax").eval()
    prompt = torch.randint(1, 40, (1, 15))
    pad = torch.tensor([[True] * 12 + [False] * 3])
    out = lm.generate(prompt, 8, key_padding_mask=pad, temperature=0)
    assert torch.equal(out[:, 12:], lm.generate(prompt[:, 12:], 8, temperature=0))
    trainer = NextTokenLM(40, 16, dim=16, depth=1, num_heads=4, mlp_dim=32, attention="softmax").eval()
    assert trainer.generate(prompt[:, 12:], 2, temperature=0).shape == (1, 5)
    with pytest.raises(ValueError, match="3 prompt tokens . max_new_tokens=15 need 17 positions, more than "
                                         "max_len=16"):  # refused before any token is made
        lm.generate(prompt[:, 12:], 15, temperature=0)  # the 14 fed back reach position 16
