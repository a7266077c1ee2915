"""timm integration: primal-dual attention inside timm's ``VisionTransformer``.

Importing this module (it needs ``timm``; the core never imports it) registers models with
``timm.models.register_model``, for every variant that applies to a 2-D grid
(:data:`GRID_VARIANTS`): ``deit_{tiny,small}_patch16_224_<variant>`` and the CIFAR-sized
``vit_cifar_<variant>`` (patch 4 on 32x32). SH pools on the 2-D patch
grid and never pools the class token (SPEC.md §2). timm builds attention from a class (it
calls ``issubclass`` on ``attn_layer``), so :func:`attention_class` returns a real subclass
carrying its configuration; the parameter names match timm's ``Attention`` (``qkv``, ``proj``),
so timm state dicts load unchanged. The model's :class:`AttentionConfig` is kept in
``model.pretrained_cfg["pda_attention"]``; ``create_model(name, attention=AttentionConfig(...))``
sets the variant's options (head scales, eps).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import replace
from typing import Any, ClassVar

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from primal_dual_attention.attention import (
    AttentionConfig,
    MultiHeadAttention,
    attention_config,
    evaluation_mode,
    variant_names,
)
from primal_dual_attention.data.images import CIFAR_MEAN, CIFAR_STD
from primal_dual_attention.models.vision import CIFAR, DEIT


class TimmAttention(MultiHeadAttention):
    """``MultiHeadAttention`` with timm's constructor and forward signature."""

    pda_config: ClassVar[AttentionConfig] = AttentionConfig()

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, norm_layer=None, device=None, dtype=None, **unused) -> None:
        if qk_norm or scale_norm or not proj_bias:
            raise ValueError("primal-dual attention supports neither qk_norm, scale_norm nor "
                             f"proj_bias=False; got qk_norm={qk_norm}, scale_norm={scale_norm}, "
                             f"proj_bias={proj_bias}")
        super().__init__(dim, num_heads, self.pda_config, qkv_bias=qkv_bias, attn_drop=attn_drop,
                         proj_drop=proj_drop, device=device, dtype=dtype)

    def __reduce_ex__(self, protocol: int) -> tuple[Any, ...]:
        """Pickle (``torch.save(model)``) through the configuration: the bound subclass is made
        at run time, so it cannot be found by name."""
        return _new_attention, (self.pda_config,), self.__getstate__()

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                key_padding_mask: Tensor | None = None, need_weights: bool = False):
        if attn_mask is not None or is_causal:
            raise ValueError("primal-dual attention takes key_padding_mask, not attn_mask/is_causal")
        return super().forward(x, key_padding_mask=key_padding_mask, need_weights=need_weights)


@functools.cache
def _cached_class(config: AttentionConfig) -> type[TimmAttention]:
    return type(f"TimmAttention_{config.variant}", (TimmAttention,), {"pda_config": config})


def _new_attention(config: AttentionConfig) -> TimmAttention:
    """An empty instance of the class bound to ``config``, for unpickling."""
    return object.__new__(_cached_class(config))


def attention_class(attention: AttentionConfig | str, **switches: Any) -> type[TimmAttention]:
    """A ``TimmAttention`` subclass bound to one configuration, for ``attn_layer=``:
    ``attention_class("bn_sh", grid_size=(14, 14), num_prefix_tokens=1)``. An SH variant without
    a grid pools the token sequence in 1-D windows, the class token with the patches: a warning
    says so (a ViT wants its patch grid and prefix tokens)."""
    config = attention_config(attention, **switches)
    if config.spec.multi_scale and config.grid_size is None:
        warnings.warn(f"attention_class({config.variant!r}) without grid_size pools the tokens in 1-D "
                      "windows, prefix (class) tokens included; for a ViT pass grid_size=(rows, cols) and "
                      "num_prefix_tokens", stacklevel=2)
    return _cached_class(config)


def _build(name: str, variant: str, pretrained: bool, *, img_size: int | tuple[int, int], patch_size: int,
           data_config: dict[str, Any], attention: AttentionConfig | None = None, **kwargs
           ) -> VisionTransformer:
    """``attention`` may set the variant's options (scales, eps, fused); a pooling (SH) variant
    takes the patch grid and the prefix tokens (class and register tokens) from the model, which
    fixes its input size; the other variants take any size timm does (``dynamic_img_size``).
    ``data_config`` (mean, std, crop, interpolation) goes into ``pretrained_cfg``, so timm's
    ``resolve_data_config`` gives the preprocessing ``pda train`` uses for the model."""
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights; train it (pda train --task image) or load "
                         "a checkpoint with load_state_dict")
    attention = attention_config(attention or variant)
    if attention.variant != variant:
        raise ValueError(f"{name} is built with variant {variant!r}, got an attention config of "
                         f"variant {attention.variant!r}")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # create_model's, not the net's
        kwargs.pop(key, None)
    img_size = to_2tuple(kwargs.pop("img_size", img_size))
    patch_size = to_2tuple(kwargs.pop("patch_size", patch_size))
    if attention.spec.multi_scale:
        if kwargs.get("dynamic_img_size"):
            raise ValueError(f"{name} pools a fixed patch grid (SH), so dynamic_img_size=True is not "
                             "supported; build the model for the input size (img_size=...)")
        if kwargs.get("patch_drop_rate"):
            raise ValueError(f"{name} pools a fixed patch grid (SH), which dropped patches break; got "
                             f"patch_drop_rate={kwargs['patch_drop_rate']} (0 is supported)")
        prefix = (0 if kwargs.get("class_token") is False else 1) + int(kwargs.get("reg_tokens") or 0)
        grid = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        attention = replace(attention, grid_size=grid, num_prefix_tokens=prefix)
    layer = attention_class(attention)
    model = VisionTransformer(img_size=img_size, patch_size=patch_size, attn_layer=layer, **kwargs)
    model.pretrained_cfg = {
        "architecture": name, "num_classes": model.num_classes, "input_size": (3, *img_size), **data_config,
        "pda_attention": layer.pda_config,
    }
    return model


#: Every variant that applies to a 2-D patch grid (all but the 1-D sparse window).
GRID_VARIANTS = variant_names(lambda v: v.supports_grid)


#: What ``pda train`` feeds each family: ImageNet statistics with timm's bicubic resize and 0.875
#: centre crop (``data.imagefolder``) for DeiT, CIFAR-10 statistics at 32x32 for ``vit_cifar``
DEIT_DATA = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "crop_pct": 0.875,
             "interpolation": "bicubic"}
CIFAR_DATA = {"mean": CIFAR_MEAN, "std": CIFAR_STD, "crop_pct": 1.0, "interpolation": "bilinear"}


def _register(name: str, variant: str, defaults: dict[str, Any], data_config: dict[str, Any]) -> str:
    def builder(pretrained: bool = False, **kwargs) -> VisionTransformer:
        return _build(name, variant, pretrained, data_config=data_config, **(defaults | kwargs))

    builder.__name__ = name
    builder.__qualname__ = name
    builder.__module__ = __name__
    builder.__doc__ = f"{name}: timm VisionTransformer with primal-dual attention variant {variant!r}."
    globals()[name] = register_model(builder)
    return name


# timm's own deit_*_patch16_224 is the softmax DeiT
#: The registered models and the variant each is built with.
REGISTERED: dict[str, str] = {
    _register(f"deit_{size}_patch16_224_{variant}", variant,
              dict(img_size=224, patch_size=16, qkv_bias=True, **dims), DEIT_DATA): variant
    for size, dims in DEIT.items() for variant in GRID_VARIANTS if variant != "softmax"
} | {
    _register(f"vit_cifar_{variant}", variant, dict(img_size=32, patch_size=4, qkv_bias=True, **CIFAR),
              CIFAR_DATA): variant
    for variant in GRID_VARIANTS
}


def attention_maps(model: VisionTransformer, images: Tensor, layer: int = 0) -> Tensor:
    """The ``(B, H, N, N)`` maps of one block, from the library's math path (``need_weights``),
    in evaluation mode (no dropout), whatever mode the model is in."""
    with evaluation_mode(model), torch.no_grad():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        for index, current in enumerate(model.blocks):
            if index == layer:
                return current.attn.forward(current.norm1(x), need_weights=True)[1]
            x = current(x)
    raise IndexError(f"layer {layer} out of range for {len(model.blocks)} blocks")
