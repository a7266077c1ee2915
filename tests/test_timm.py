"""timm integration: registered models, parity with timm's own ViT, prefix tokens kept."""

from __future__ import annotations

import warnings

import pytest
import torch

timm = pytest.importorskip("timm")
from primal_dual_attention.attention import VARIANTS, AttentionConfig  # noqa: E402
from primal_dual_attention.timm import REGISTERED, attention_class, attention_maps  # noqa: E402


@pytest.mark.parametrize("name", REGISTERED)
def test_every_registered_model_trains(name):
    small = {"img_size": 32} if name.startswith("deit") else {}
    model = timm.create_model(name, pretrained=False, num_classes=5, depth=2, **small)
    images = torch.randn(2, 3, 32, 32)
    model(images).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    config = model.pretrained_cfg["pda_attention"]
    assert name.endswith(config.variant)
    side = 32 // model.patch_embed.patch_size[0]
    if config.spec.multi_scale:  # only SH pools the grid; the others take any input size
        assert config.num_prefix_tokens == 1 and config.grid_size == (side, side)
    else:
        assert config.num_prefix_tokens == 0 and config.grid_size is None


def test_every_grid_variant_is_registered():
    for variant in VARIANTS.values():
        assert (f"vit_cifar_{variant.name}" in REGISTERED) == variant.supports_grid
        if variant.name != "softmax":  # timm's own deit_tiny_patch16_224 is the softmax one
            assert (f"deit_tiny_patch16_224_{variant.name}" in REGISTERED) == variant.supports_grid
    assert set(REGISTERED) <= set(timm.list_models())


def test_softmax_variant_matches_timm_vit_with_the_same_weights():
    torch.manual_seed(0)
    ours = timm.create_model("vit_cifar_softmax", depth=2).eval()
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=128, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=10,
        qkv_bias=True).eval()
    ours.load_state_dict(reference.state_dict())  # same parameter names
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(ours(images), reference(images), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_keeps_the_attention_config():
    model = timm.create_model("deit_tiny_patch16_224_bn_sh", img_size=64, depth=1).eval()
    clone = timm.create_model(model.pretrained_cfg["architecture"], img_size=64, depth=1).eval()
    clone.load_state_dict(model.state_dict())
    assert clone.pretrained_cfg["pda_attention"] == model.pretrained_cfg["pda_attention"]
    images = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(clone(images), model(images))


def test_sh_pools_the_patch_grid_and_keeps_the_class_token():
    assert timm.create_model("vit_cifar_sh", depth=1).blocks[0].attn.head_scales == (1, 1, 2, 2)
    model = timm.create_model("vit_cifar_sh", depth=1,
                              attention=AttentionConfig(variant="sh", head_scales=(1, 2, 4, 8))).eval()
    attn = model.blocks[0].attn
    assert attn.config.grid_size == (8, 8) and attn.config.num_prefix_tokens == 1
    assert attn.head_scales == (1, 2, 4, 8)
    maps = attention_maps(model, torch.randn(2, 3, 32, 32), layer=0)
    assert maps.shape == (2, 4, 65, 65)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 4, 65))
    # head with scale 8 pools the 8x8 grid to one key: all patches share one weight, the class
    # token keeps its own
    patches = maps[:, 3, :, 1:]
    torch.testing.assert_close(patches, patches[..., :1].expand_as(patches))
    assert (maps[:, 3, :, 0] != patches[..., 0]).any()


@pytest.mark.parametrize("variant", ["softmax", "bn", "sh", "bn_sh"])
def test_register_tokens_and_rectangular_images(variant):
    """timm's own options keep working: register tokens are prefix tokens SH never pools, a
    rectangular image gives a rectangular grid, and the variants that do not pool take any input
    size timm does."""
    model = timm.create_model(f"vit_cifar_{variant}", depth=1, reg_tokens=4, img_size=(32, 48)).eval()
    config = model.pretrained_cfg["pda_attention"]
    assert model(torch.randn(2, 3, 32, 48)).shape == (2, 10)
    if config.spec.multi_scale:
        assert config.grid_size == (8, 12) and config.num_prefix_tokens == 5
        with pytest.raises(ValueError, match="dynamic_img_size"):
            timm.create_model(f"vit_cifar_{variant}", depth=1, dynamic_img_size=True)
    else:
        resizable = timm.create_model(f"vit_cifar_{variant}", depth=1, dynamic_img_size=True).eval()
        assert resizable(torch.randn(1, 3, 48, 48)).shape == (1, 10)


def test_whole_models_pickle():
    import io

    model = timm.create_model("vit_cifar_bn_sh", depth=1).eval()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    clone = torch.load(buffer, weights_only=False)
    images = torch.randn(1, 3, 32, 32)
    assert type(clone.blocks[0].attn) is type(model.blocks[0].attn)
    torch.testing.assert_close(clone(images), model(images))


def test_unsupported_options_are_refused():
    with pytest.raises(ValueError, match="qk_norm"):
        attention_class("bn")(64, num_heads=4, qk_norm=True)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("vit_cifar_bn", pretrained=True)
    with pytest.raises(ValueError, match="variant 'sh'"):
        timm.create_model("vit_cifar_bn", attention=AttentionConfig(variant="sh"))
    with pytest.raises(ValueError, match="patch_drop_rate=0.5"):
        timm.create_model("vit_cifar_sh", patch_drop_rate=0.5)
    timm.create_model("vit_cifar_bn", patch_drop_rate=0.5)  # no grid to break


@pytest.mark.parametrize("name, mean, crop_pct, interpolation", [
    ("vit_cifar_bn", (0.4914, 0.4822, 0.4465), 1.0, "bilinear"),
    ("deit_tiny_patch16_224_bn", timm.data.IMAGENET_DEFAULT_MEAN, 0.875, "bicubic")])
def test_timm_data_config_is_the_preprocessing_of_pda_train(name, mean, crop_pct, interpolation):
    from primal_dual_attention.data.images import CIFAR_MEAN

    model = timm.create_model(name, depth=1)
    config = timm.data.resolve_data_config({}, model=model)
    assert (config["mean"], config["crop_pct"], config["interpolation"]) == (mean, crop_pct, interpolation)
    assert (config["mean"] == CIFAR_MEAN) == name.startswith("vit_cifar")


def test_flop_counting_switches_timm_attention_to_its_math_path_too():
    from primal_dual_attention.attention import fused_paths

    ours = timm.create_model("deit_tiny_patch16_224_bn", img_size=32, depth=1)
    theirs = timm.create_model("deit_tiny_patch16_224", img_size=32, depth=1)
    with fused_paths(ours, False), fused_paths(theirs, False):
        assert not ours.blocks[0].attn.fused_attn and not theirs.blocks[0].attn.fused_attn
    assert ours.blocks[0].attn.fused_attn and theirs.blocks[0].attn.fused_attn


def test_an_sh_class_without_a_grid_warns():
    """attention_class("sh") alone pools a ViT's tokens in 1-D windows, class token included."""
    with pytest.warns(UserWarning, match=r"attention_class\('sh'\) without grid_size pools the tokens"):
        attention_class("sh")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention_class("sh", grid_size=(4, 4), num_prefix_tokens=1, head_scales=(1, 1, 2, 2))
