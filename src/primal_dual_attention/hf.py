"""Hugging Face ``transformers`` integration: ``attn_implementation="pda_<variant>"``.

``register()`` adds one attention function per variant to ``transformers.AttentionInterface``
and, under the same name, a mask function to ``AttentionMaskInterface`` that hands the attention
function the ``(B, S)`` padding mask (True = keep) instead of a 4-D bias, so padding reaches
the BN statistics and the SH windows. A module with ``is_causal`` (Llama-style decoders) gets
the causal variant (SPEC.md §2 "Causal"), others (BERT, ViT) the bidirectional one; on a model
whose config has ``image_size`` and ``patch_size`` (ViT) SH pools the 2-D patch grid and leaves
the leading class token unpooled. Generation uses the model's own key/value cache: the causal
functions take the new queries against all cached keys.

Settings, per model through config attributes (``config.pda_head_scales``, ``config.pda_eps``,
``config.pda_window``) or for every model as keywords of :func:`register`.

``transformers`` is imported lazily (the ``[hf]`` extra).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from primal_dual_attention.attention import VARIANTS, AttentionConfig
from primal_dual_attention.functional import attention

PREFIX = "pda_"


def _padding_mask(
    batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
    attention_mask: Tensor | None = None, **kwargs: object,
) -> Tensor | None:
    """Mask function for ``AttentionMaskInterface``: the 2-D mask of the keys (True = keep),
    padded with False as transformers pads it, or None without padding."""
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.bool)
    if (missing := kv_offset + kv_length - mask.shape[-1]) > 0:
        mask = torch.nn.functional.pad(mask, (0, missing), value=False)
    mask = mask[:, kv_offset : kv_offset + kv_length]
    return None if bool(mask.all()) else mask


@functools.lru_cache(maxsize=256)
def _config(variant: str, num_heads: int, causal: bool, num_tokens: int, grid: tuple[int, int] | None,
            head_scales: tuple[int, ...] | None, eps: float, window: int | None) -> AttentionConfig:
    spec = VARIANTS[variant]
    options: dict[str, object] = {"variant": variant, "eps": eps, "causal": causal}
    if spec.multi_scale:
        options["head_scales"] = head_scales
        if grid is not None and not causal:
            options.update(grid_size=grid, num_prefix_tokens=num_tokens - grid[0] * grid[1])
    if spec.sparse:
        if window is None:
            raise ValueError(f"attn_implementation {PREFIX}{variant} needs a window: set config.pda_window "
                             "or register(window=...)")
        options["window"] = window
    return AttentionConfig(**options).for_heads(num_heads)


def _grid(config: object, num_tokens: int) -> tuple[int, int] | None:
    """The patch grid of a vision config (``image_size`` / ``patch_size``), else None."""
    image, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if image is None or patch is None:
        return None
    image = (image, image) if isinstance(image, int) else tuple(image)
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    grid = (image[0] // patch[0], image[1] // patch[1])
    if grid[0] * grid[1] > num_tokens:
        raise ValueError(f"the {grid[0]}x{grid[1]} patch grid of image_size {image} and patch_size {patch} "
                         f"holds more than the {num_tokens} tokens the attention received")
    return grid


def _key_padding_mask(attention_mask: Tensor | None, num_keys: int) -> Tensor | None:
    """True = padding, from the 2-D keep-mask of :func:`_padding_mask` or a 4-D mask (bool keep,
    or additive float with 0 = keep) of another mask function: a key no query keeps is padding."""
    if attention_mask is None:
        return None
    keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    if keep.ndim == 4:
        keep = keep.any(dim=-2).all(dim=1)
    return ~keep[:, -num_keys:]


def make_attention_function(variant: str, *, head_scales: Sequence[int] | None = None, eps: float = 1e-5,
                            window: int | None = None) -> Callable[..., tuple[Tensor, None]]:
    """The ``AttentionInterface`` function of one variant (``register`` adds one per variant)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    defaults = {"head_scales": None if head_scales is None else tuple(head_scales), "eps": eps,
                "window": window}

    def forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                **kwargs: object) -> tuple[Tensor, None]:
        config = getattr(module, "config", None)
        settings = {name: getattr(config, f"pda_{name}", value) for name, value in defaults.items()}
        if settings["head_scales"] is not None:
            settings["head_scales"] = tuple(settings["head_scales"])
        causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
        groups = query.shape[1] // key.shape[1]  # grouped-query attention: share each key/value head
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        num_keys = key.shape[2]
        grid = None if causal or query.shape[2] != num_keys else _grid(config, num_keys)
        options = _config(variant, query.shape[1], causal, num_keys, grid, **settings)
        if scaling is not None and not math.isclose(scaling, query.shape[-1] ** -0.5):
            if options.bn or options.kernel != "softmax":
                raise ValueError(f"{PREFIX}{variant} fixes its own scale (1/sqrt(D) after BN, none for the "
                                 f"linear kernel); the model asks for scaling={scaling}")
            query = query * (scaling * math.sqrt(query.shape[-1]))
        padding = _key_padding_mask(attention_mask, num_keys)
        out = attention(query, key, value, options, key_padding_mask=padding, dropout_p=dropout)
        return out.transpose(1, 2).contiguous(), None

    forward.__name__ = f"{PREFIX}{variant}"
    return forward


def register(*, head_scales: Sequence[int] | None = None, eps: float = 1e-5, window: int | None = None
             ) -> list[str]:
    """Register ``pda_<variant>`` for every variant with ``transformers`` (attention and mask
    functions); the keywords are defaults that a model's ``config.pda_<name>`` overrides.
    Returns the registered names."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    names = []
    for variant in VARIANTS:
        name = f"{PREFIX}{variant}"
        AttentionInterface.register(name, make_attention_function(variant, head_scales=head_scales, eps=eps,
                                                                  window=window))
        AttentionMaskInterface.register(name, _padding_mask)
        names.append(name)
    return names
