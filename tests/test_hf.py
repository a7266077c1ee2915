"""Hugging Face integration on tiny random configs (no download): Llama, BERT, ViT."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from primal_dual_attention import VARIANTS  # noqa: E402
from primal_dual_attention.hf import register  # noqa: E402

NAMES = register()


def llama():
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32)
    config.pda_window = 2
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def bert():
    config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=48, max_position_embeddings=32)
    config.pda_window = 2
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def vit():
    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=48)
    config.pda_head_scales, config.pda_window = (1, 1, 2, 2), 2  # 4x4 patches: pooled 2x2 + class token
    return transformers.ViTModel(config, add_pooling_layer=False).eval()


def text_inputs():
    ids = torch.randint(0, 40, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


CASES = {
    "llama": (llama, text_inputs, lambda out: out.logits),
    "bert": (bert, text_inputs, lambda out: out.last_hidden_state),
    "vit": (vit, lambda: {"pixel_values": torch.randn(2, 3, 16, 16)}, lambda out: out.last_hidden_state),
}


@pytest.mark.parametrize("arch", list(CASES))
def test_pda_softmax_equals_sdpa(arch):
    build, inputs, result = CASES[arch]
    model, batch = build(), inputs()
    expected = result(model(**batch))
    model.set_attn_implementation("pda_softmax")
    out = result(model(**batch))
    keep = batch["attention_mask"].bool() if "attention_mask" in batch else slice(None)
    torch.testing.assert_close(out[keep], expected[keep], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", list(CASES))
def test_every_variant_runs_forward_and_backward(arch):
    build, inputs, result = CASES[arch]
    model, batch = build(), inputs()
    assert [f"pda_{v}" for v in VARIANTS] == NAMES
    for name in NAMES:
        model.set_attn_implementation(name)
        model.zero_grad()
        out = result(model(**batch))
        out.square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert torch.isfinite(out).all() and grads and all(torch.isfinite(g).all() for g in grads), name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generate_with_cache_equals_without(variant):
    model, batch = llama(), text_inputs()
    model.set_attn_implementation(f"pda_{variant}")
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with_cache = model.generate(**batch, use_cache=True, **kwargs)
    without = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)


def test_config_settings_reach_the_attention():
    model, batch = vit(), {"pixel_values": torch.randn(1, 3, 16, 16)}
    model.set_attn_implementation("pda_bn_sh")
    pooled = model(**batch).last_hidden_state
    model.config.pda_head_scales = (1, 1, 1, 1)
    assert not torch.allclose(model(**batch).last_hidden_state, pooled)
    model.config.pda_eps = 10.0
    model.config.pda_head_scales = (1, 1, 2, 2)
    assert not torch.allclose(model(**batch).last_hidden_state, pooled)
    model.config.pda_head_scales = (1, 2)
    with pytest.raises(ValueError, match="one entry per head"):
        model(**batch)
