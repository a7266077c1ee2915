"""timm integration: primal-dual attention inside timm's ``VisionTransformer``.

Importing this module (it needs ``timm``; the core never imports it) registers models with
``timm.models.register_model``: ``deit_{tiny,small}_patch16_224_{bn,sh,bn_sh}`` and the
CIFAR-sized ``vit_cifar_{softmax,bn,sh,bn_sh}`` (patch 4 on 32x32). SH pools on the 2-D patch
grid and never pools the class token (SPEC.md §2). timm builds attention from a class (it
calls ``issubclass`` on ``attn_layer``), so :func:`attention_class` returns a real subclass
carrying its configuration; the parameter names match timm's ``Attention`` (``qkv``, ``proj``),
so timm state dicts load unchanged. The attention configuration is kept in
``model.pretrained_cfg["pda_attention"]``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from primal_dual_attention.attention import MultiHeadAttention, get_variant


class TimmAttention(MultiHeadAttention):
    """``MultiHeadAttention`` with timm's constructor and forward signature."""

    pda_config: ClassVar[dict[str, Any]] = {"variant": "softmax"}

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, norm_layer=None, device=None, dtype=None, **unused) -> None:
        if qk_norm or scale_norm or not proj_bias:
            raise ValueError("primal-dual attention supports neither qk_norm, scale_norm nor "
                             f"proj_bias=False; got qk_norm={qk_norm}, scale_norm={scale_norm}, "
                             f"proj_bias={proj_bias}")
        config = dict(self.pda_config)
        super().__init__(dim, num_heads, variant=config.pop("variant"), qkv_bias=qkv_bias,
                         attn_drop=attn_drop, proj_drop=proj_drop, device=device, dtype=dtype, **config)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                key_padding_mask: Tensor | None = None, need_weights: bool = False):
        if attn_mask is not None or is_causal:
            raise ValueError("primal-dual attention takes key_padding_mask, not attn_mask/is_causal")
        return super().forward(x, key_padding_mask=key_padding_mask, need_weights=need_weights)


@functools.cache
def _cached_class(variant: str, head_scales: tuple[int, ...] | None, grid_size: tuple[int, int] | None,
                  num_prefix_tokens: int) -> type[TimmAttention]:
    config = {"variant": variant, "head_scales": head_scales, "grid_size": grid_size,
              "num_prefix_tokens": num_prefix_tokens}
    return type(f"TimmAttention_{variant}", (TimmAttention,), {"pda_config": config})


def attention_class(variant: str, *, head_scales: Sequence[int] | None = None,
                    grid_size: tuple[int, int] | None = None, num_prefix_tokens: int = 0
                    ) -> type[TimmAttention]:
    """A ``TimmAttention`` subclass bound to one configuration, for ``attn_layer=``."""
    get_variant(variant)
    return _cached_class(variant, None if head_scales is None else tuple(head_scales),
                         None if grid_size is None else tuple(grid_size), num_prefix_tokens)


def _build(name: str, variant: str, pretrained: bool, *, img_size: int, patch_size: int,
           head_scales: Sequence[int] | None = None, **kwargs) -> VisionTransformer:
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights; train it (pda train --task image) or load "
                         "a checkpoint with load_state_dict")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # create_model's, not the net's
        kwargs.pop(key, None)
    img_size = kwargs.pop("img_size", img_size)
    patch_size = kwargs.pop("patch_size", patch_size)
    grid = (img_size // patch_size, img_size // patch_size)
    prefix = 0 if kwargs.get("class_token") is False else 1
    layer = attention_class(variant, head_scales=head_scales, grid_size=grid, num_prefix_tokens=prefix)
    model = VisionTransformer(img_size=img_size, patch_size=patch_size, attn_layer=layer, **kwargs)
    model.pretrained_cfg = {
        "architecture": name, "num_classes": model.num_classes, "input_size": (3, img_size, img_size),
        "pda_attention": dict(layer.pda_config),
    }
    return model


DEIT = {"tiny": dict(embed_dim=192, depth=12, num_heads=3),
        "small": dict(embed_dim=384, depth=12, num_heads=6)}
CIFAR = dict(embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0, num_classes=10)


def _register(name: str, variant: str, defaults: dict[str, Any]) -> None:
    def builder(pretrained: bool = False, **kwargs) -> VisionTransformer:
        return _build(name, variant, pretrained, **(defaults | kwargs))

    builder.__name__ = name
    builder.__qualname__ = name
    builder.__module__ = __name__
    builder.__doc__ = f"{name}: timm VisionTransformer with primal-dual attention variant {variant!r}."
    globals()[name] = register_model(builder)


for _size, _dims in DEIT.items():
    for _variant in ("bn", "sh", "bn_sh"):
        _register(f"deit_{_size}_patch16_224_{_variant}", _variant,
                  dict(img_size=224, patch_size=16, qkv_bias=True, **_dims))
for _variant in ("softmax", "bn", "sh", "bn_sh"):
    _register(f"vit_cifar_{_variant}", _variant, dict(img_size=32, patch_size=4, qkv_bias=True, **CIFAR))

REGISTERED = [f"deit_{s}_patch16_224_{v}" for s in DEIT for v in ("bn", "sh", "bn_sh")] + [
    f"vit_cifar_{v}" for v in ("softmax", "bn", "sh", "bn_sh")]


def attention_maps(model: VisionTransformer, images: Tensor, layer: int = 0) -> Tensor:
    """The ``(B, H, N, N)`` maps of one block, from the library's math path (``need_weights``)."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.norm_pre(model.patch_drop(x))
    with torch.no_grad():
        for index, current in enumerate(model.blocks):
            if index == layer:
                return current.attn.forward(current.norm1(x), need_weights=True)[1]
            x = current(x)
    raise IndexError(f"layer {layer} out of range for {len(model.blocks)} blocks")
