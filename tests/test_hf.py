"""Hugging Face integration on tiny random configs (no download): Llama, BERT, ViT."""

from __future__ import annotations

import inspect

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


@pytest.mark.parametrize("variant", ["softmax", "linear", "bn"])
def test_llama_under_bf16_autocast(variant):
    """Llama's rotary embedding gives float32 queries and keys beside bf16 values under autocast:
    pda attention takes them as SDPA does (it refused mixed dtypes), softmax close to sdpa's."""
    model, batch = llama(), text_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(**batch).logits
        model.set_attn_implementation(f"pda_{variant}")
        out = model(**batch).logits
    assert torch.isfinite(out).all()
    if variant == "softmax":
        keep = batch["attention_mask"].bool()
        torch.testing.assert_close(out[keep].float(), expected[keep].float(), rtol=0, atol=0.05)


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


@pytest.mark.parametrize("variant", ["softmax", "bn", "sh", "linear"])
def test_static_cache_equals_no_cache(variant):
    """A static cache holds more keys than are written: the unwritten ones are cut off, so the
    queries still line up with their own positions (prefill and one decoding step)."""
    model, batch = llama(), text_inputs()
    model.set_attn_implementation(f"pda_{variant}")
    expected = model(**batch, use_cache=False).logits
    cache = transformers.StaticCache(config=model.config, max_cache_len=16)
    # the keyword is `cache` from transformers 5.2x (`past_key_values` until then)
    cache_keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    prefill = model(**batch, **{cache_keyword: cache}, use_cache=True).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(prefill[keep], expected[keep], rtol=0, atol=1e-5)
    step = torch.randint(0, 40, (2, 1))
    mask = torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    full = model(input_ids=torch.cat([batch["input_ids"], step], 1), attention_mask=mask, use_cache=False)
    decoded = model(input_ids=step, attention_mask=mask, **{cache_keyword: cache}, use_cache=True)
    torch.testing.assert_close(decoded.logits[:, -1], full.logits[:, -1], rtol=0, atol=1e-5)


def mistral(sliding_window):
    config = transformers.MistralConfig(vocab_size=40, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=32, sliding_window=sliding_window)
    return transformers.MistralForCausalLM(config).eval()


def test_masks_beyond_padding_and_causal_order_are_refused():
    """A sliding window shorter than the sequence and packed sequences hide keys the attention
    would see: an error, not a different model. A window longer than the sequence hides nothing."""
    ids = torch.randint(0, 40, (2, 9))
    wide = mistral(sliding_window=16)
    expected = wide(input_ids=ids).logits
    wide.set_attn_implementation("pda_softmax")
    torch.testing.assert_close(wide(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    narrow = mistral(sliding_window=3)
    narrow.set_attn_implementation("pda_softmax")
    with pytest.raises(ValueError, match="sliding window"):
        narrow(input_ids=ids)
    model = llama()
    model.set_attn_implementation("pda_softmax")
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]] * 2)
    with pytest.raises(ValueError, match="packed sequences"):
        model(input_ids=ids, position_ids=packed, use_cache=False)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generation_past_a_sliding_window_is_refused(cache):
    """A sliding-window cache drops its oldest keys once the sequence outgrows the window: the
    queries would see a window (a static cache also re-read the mask it was handed, cutting the
    newest keys), so decoding stops with an error; up to the window it equals sdpa."""
    model, ids = mistral(sliding_window=10), torch.randint(1, 40, (2, 9))
    settings = dict(do_sample=False, pad_token_id=0, cache_implementation=cache)
    expected = model.generate(input_ids=ids, max_new_tokens=1, **settings)
    model.set_attn_implementation("pda_softmax")
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=1, **settings), expected)
    with pytest.raises(ValueError, match="grown past it"):
        model.generate(input_ids=ids, max_new_tokens=4, **settings)


def test_score_biases_are_refused():
    """T5's relative position bias and a 4-D mask that carries a bias (Swin's) are not key padding."""
    from primal_dual_attention.hf import make_attention_function

    config = transformers.T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4)
    t5 = transformers.T5Model(config).eval()
    t5.set_attn_implementation("pda_softmax")
    ids = torch.randint(0, 40, (1, 5))
    with pytest.raises(ValueError, match="position_bias"):
        t5(input_ids=ids, decoder_input_ids=ids)
    q = k = v = torch.randn(1, 2, 4, 8)
    biased = torch.zeros(1, 1, 4, 4)
    biased[..., 0] = -100.0  # Swin's shifted-window mask: large, not -inf
    with pytest.raises(ValueError, match="bias"):
        make_attention_function("softmax")(torch.nn.Module(), q, k, v, biased)
    hidden = torch.zeros(1, 1, 4, 4)
    hidden[..., 0] = torch.finfo(torch.float32).min  # additive padding is fine
    out, _ = make_attention_function("softmax")(torch.nn.Module(), q, k, v, hidden)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k[..., 1:, :], v[..., 1:, :])
    torch.testing.assert_close(out.transpose(1, 2), expected)


def test_vit_at_another_image_size():
    """``interpolate_pos_encoding``: the variants that do not pool follow; SH needs
    ``config.pda_num_prefix_tokens`` to find the patch grid, and says so."""
    model, images = vit(), torch.randn(1, 3, 32, 32)
    expected = model(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state
    model.set_attn_implementation("pda_softmax")
    torch.testing.assert_close(model(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state,
                               expected, rtol=0, atol=1e-5)
    model.set_attn_implementation("pda_sh")
    with pytest.raises(ValueError, match="pda_num_prefix_tokens"):
        model(pixel_values=images, interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match="pda_num_prefix_tokens"):  # 5x5 patches: 10 tokens more, not 4x4
        model(pixel_values=torch.randn(1, 3, 20, 20), interpolate_pos_encoding=True)
    model.config.pda_num_prefix_tokens = 1
    assert model(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state.shape == (1, 65, 32)


def test_sh_refuses_tokens_after_the_patch_grid_and_names_bad_head_scales():
    """YOLOS appends detection tokens after its patches: SH would pool them as patches."""
    config = transformers.YolosConfig(image_size=[16, 16], patch_size=4, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, intermediate_size=48, num_detection_tokens=3)
    config.pda_head_scales = (1, 1, 2, 2)
    yolos = transformers.YolosModel(config, add_pooling_layer=False).eval()
    yolos.set_attn_implementation("pda_sh")
    with pytest.raises(ValueError, match="3 detection tokens after its patch grid"):
        yolos(pixel_values=torch.randn(1, 3, 16, 16))
    yolos.set_attn_implementation("pda_bn")  # nothing pooled: the order of the tokens does not matter
    assert yolos(pixel_values=torch.randn(1, 3, 16, 16)).last_hidden_state.shape == (1, 20, 32)
    model = vit()
    model.config.pda_head_scales = 2
    model.set_attn_implementation("pda_sh")
    with pytest.raises(TypeError, match="config.pda_head_scales must be a sequence .* got 2"):
        model(pixel_values=torch.randn(1, 3, 16, 16))
    model.config.pda_head_scales = torch.tensor([1, 1, 2, 2])  # any sequence of ints
    assert model(pixel_values=torch.randn(1, 3, 16, 16)).last_hidden_state.shape == (1, 17, 32)
