"""Hugging Face ``transformers`` integration: ``attn_implementation="pda_<variant>"``.

``register()`` adds one attention function per variant to ``transformers.AttentionInterface``
and, under the same name, a mask function to ``AttentionMaskInterface`` that hands the attention
function the ``(B, S)`` padding mask (True = keep) instead of a 4-D bias, so padding reaches
the BN statistics and the SH windows. A module with ``is_causal`` (Llama-style decoders) gets
the causal variant (SPEC.md §2 "Causal"), others (BERT, ViT) the bidirectional one; on a model
whose config has ``image_size`` and ``patch_size`` (ViT) SH pools the 2-D patch grid and leaves
the leading tokens before the grid unpooled (``config.pda_num_prefix_tokens`` says how many
where the input's size differs from the config's). Generation uses the model's own key/value
cache, dynamic or static: the causal functions take the new queries against the cached keys.

The attention is key padding plus (for decoders) causal order, exactly (SPEC.md §2). A model
whose mask says more (a sliding window shorter than the sequence, packed sequences, a score
bias such as T5's relative positions, logit soft-capping, attention sinks) gets an error naming
it rather than a different model.

Settings, per model through config attributes (``config.pda_head_scales``, ``config.pda_eps``,
``config.pda_window``) or for every model as keywords of :func:`register`.

``transformers`` is imported lazily (the ``[hf]`` extra).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from primal_dual_attention.attention import VARIANTS, AttentionConfig
from primal_dual_attention.functional import attention

PREFIX = "pda_"


def _padding_mask(
    batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
    mask_function: Callable[..., Tensor] | None = None, attention_mask: Tensor | None = None,
    **kwargs: object,
) -> Tensor | None:
    """Mask function for ``AttentionMaskInterface``: the keys' 2-D keep-mask (True = keep) that,
    with the attention's own order (causal: the queries are the last keys), is exactly the mask
    transformers asks for; None when every key is kept. Keys a static cache has not filled yet
    (after the last query) are cut off, so the mask is then shorter than the keys and the
    attention function drops the rest. Anything more than key padding and causal order (a
    sliding window that reaches back less far than the sequence, in one pass or in a cache that
    has dropped keys, packed sequences, a model's own ``and``/``or`` masks) is an error: the
    attention has no such pattern (SPEC.md §2)."""
    from transformers import masking_utils

    if kv_offset:  # a sliding-window cache has dropped its oldest keys, so the queries see a window
        raise ValueError(f"{PREFIX}* attention takes key padding and causal order only, but this layer's "
                         f"cache keeps a sliding window, and the sequence has grown past it (kv_offset="
                         f"{int(kv_offset)}): use an attention implementation of transformers for it")
    padding = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)  # padded with 0
    padding = None if padding is None else padding.to(torch.bool)
    if mask_function is masking_utils.causal_mask_function:  # the common cases, without a 4-D mask
        written = max(0, min(kv_length, q_offset + q_length - kv_offset))  # keys up to the last query
        keep = None if padding is None else padding[:, kv_offset : kv_offset + written]
        if written < kv_length and keep is None:
            keep = torch.ones(batch_size, written, dtype=torch.bool, device=kwargs.get("device", "cpu"))
    elif mask_function is masking_utils.bidirectional_mask_function or mask_function is None:
        keep = None if padding is None else padding[:, kv_offset : kv_offset + kv_length]
    else:
        full = masking_utils.sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
            kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
            allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
            use_vmap=bool(kwargs.get("use_vmap", False)), device=kwargs.get("device", "cpu"))
        keep = _keys_of(full, q_length, causal=None)
    return None if keep is None or (keep.shape[-1] == kv_length and bool(keep.all())) else keep


def _expected(keep: Tensor, q_length: int, causal: bool) -> Tensor:
    """``(B, 1, q, K)``: what the attention sees with key keep-mask ``keep`` ``(B, K)``, causal
    (query i is key K - q + i and sees the keys up to it) or not."""
    seen = keep[:, None, None, :].expand(-1, 1, q_length, -1)
    if not causal:
        return seen
    num_keys = keep.shape[-1]
    order = torch.arange(num_keys, device=keep.device) <= (
        torch.arange(q_length, device=keep.device)[:, None] + num_keys - q_length)
    return seen & order


def _keys_of(full: Tensor, q_length: int, causal: bool | None) -> Tensor:
    """The key keep-mask ``(B, K)`` that gives the 4-D keep-mask ``full`` ``(B, 1 or H, q, N)`` in
    the attention's order (``causal`` None: whichever order matches), with K < N when the keys
    after the last query are hidden from every query (an unfilled static cache). A mask that no
    key padding gives is an error naming what the attention cannot do."""
    visible = full.any(dim=-2).all(dim=1)  # (B, N): a key no query sees is padding
    num_keys = full.shape[-1]
    if causal is not False and q_length < num_keys:  # cut the keys nobody sees after the queries
        seen = visible.any(dim=0).nonzero()
        num_keys = max(q_length, int(seen.max()) + 1 if len(seen) else q_length)
    keep, shown = visible[:, :num_keys], full[..., :num_keys]
    orders = (False, True) if causal is None else (causal,)
    if not full[..., num_keys:].any() and any(
            torch.equal(shown, _expected(keep, q_length, order).expand_as(shown)) for order in orders):
        return keep
    raise ValueError(
        f"{PREFIX}* attention takes key padding and causal order only, but this model's mask has "
        "another pattern (a sliding window shorter than the sequence, packed sequences, chunked "
        "or bidirectional blocks, or a bias): use an attention implementation of transformers for it")


@functools.lru_cache(maxsize=256)
def _config(variant: str, num_heads: int, causal: bool, grid: tuple[tuple[int, int], int] | None,
            head_scales: tuple[int, ...] | None, eps: float, window: int | None) -> AttentionConfig:
    spec = VARIANTS[variant]
    options: dict[str, object] = {"variant": variant, "eps": eps, "causal": causal}
    if spec.multi_scale:
        options["head_scales"] = head_scales
        if grid is not None and not causal:
            options.update(grid_size=grid[0], num_prefix_tokens=grid[1])
    if spec.sparse:
        if window is None:
            raise ValueError(f"attn_implementation {PREFIX}{variant} needs a window: set config.pda_window "
                             "or register(window=...)")
        options["window"] = window
    return AttentionConfig(**options).for_heads(num_heads)


def _grid(config: object, num_tokens: int) -> tuple[tuple[int, int], int] | None:
    """``(grid, prefix tokens)`` of a vision config (``image_size`` / ``patch_size``), else None:
    the tokens before the patch grid (class, distillation, register tokens) are
    ``config.pda_num_prefix_tokens`` where set, else those the config's grid leaves over. An input
    of another size than the config's (``interpolate_pos_encoding``) needs the setting, and then
    a square grid; without it, leftover tokens that are not fewer than a row of patches are an
    error (the input's size differs), as pooling them would pool the wrong tokens."""
    image, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if image is None or patch is None:
        return None
    if getattr(config, "num_detection_tokens", 0):  # YOLOS: its detection tokens follow the patches
        raise ValueError(f"this model appends {config.num_detection_tokens} detection tokens after its patch "
                         "grid, which SH would pool as patches; use a variant without SH for it")
    image = (image, image) if isinstance(image, int) else tuple(image)
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    grid = (image[0] // patch[0], image[1] // patch[1])
    prefix = getattr(config, "pda_num_prefix_tokens", None)
    if prefix is None:  # another input size adds or removes at least a row or column of patches,
        prefix = num_tokens - grid[0] * grid[1]  # more than the few class/register tokens
        if not 0 <= prefix < min(grid):
            raise ValueError(
                f"the attention received {num_tokens} tokens, which the {grid[0]}x{grid[1]} patch grid of "
                f"image_size {image} and patch_size {patch} does not fit (the input's size differs from the "
                "config's?): set config.pda_num_prefix_tokens to the tokens before the patches")
    elif num_tokens - prefix != grid[0] * grid[1]:
        side = math.isqrt(max(num_tokens - prefix, 0))
        if side * side != num_tokens - prefix:
            raise ValueError(f"the attention received {num_tokens} tokens: the {num_tokens - prefix} after "
                             f"config.pda_num_prefix_tokens={prefix} are neither the config's "
                             f"{grid[0]}x{grid[1]} patch grid nor a square one")
        grid = (side, side)
    return grid, prefix


def _key_padding_mask(attention_mask: Tensor | None, q_length: int, num_keys: int, causal: bool
                      ) -> Tensor | None:
    """True = padding, ``(B, K)`` with K <= ``num_keys`` (the attention drops the keys after K: an
    unfilled static cache), from the 2-D keep-mask of :func:`_padding_mask` or a 4-D mask of
    another mask function (bool keep, or additive float with 0 = keep and a large negative =
    hidden), which must be key padding in the attention's order (:func:`_keys_of`)."""
    if attention_mask is None:
        return None
    if attention_mask.ndim == 2:
        keep = attention_mask.to(torch.bool)
        return ~(keep[:, -num_keys:] if keep.shape[-1] > num_keys else keep)
    if attention_mask.dtype == torch.bool:
        keep = attention_mask
    else:
        keep = attention_mask == 0
        hidden = attention_mask <= torch.finfo(attention_mask.dtype).min / 2
        if not bool((keep | hidden).all()):
            raise ValueError(f"{PREFIX}* attention takes key padding and causal order only, but this "
                             "model's attention mask adds a bias to the scores (e.g. relative positions)")
    return ~_keys_of(keep, q_length, causal)


UNSUPPORTED_KEYWORDS = ("position_bias", "softcap", "s_aux", "sinks", "cu_seq_lens_q", "cu_seq_lens_k")


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
        scales = settings["head_scales"]
        if scales is not None:  # a list, tuple, array or tensor of ints
            if isinstance(scales, str | bytes) or not isinstance(scales, Iterable):
                raise TypeError("config.pda_head_scales must be a sequence of pooling factors, one per "
                                f"head, got {scales!r}")
            settings["head_scales"] = tuple(scales)
        given = [name for name in UNSUPPORTED_KEYWORDS if kwargs.get(name) is not None]
        if given:
            raise ValueError(f"{PREFIX}{variant} does not take {given}, which {type(module).__name__} passes "
                             "to its attention (a score bias, logit soft-capping, attention sinks or packed "
                             "sequences change the attention SPEC.md §2 defines); use one of transformers' "
                             "attention implementations for this model")
        causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
        groups = query.shape[1] // key.shape[1]  # grouped-query attention: share each key/value head
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        padding = _key_padding_mask(attention_mask, query.shape[2], key.shape[2], causal)
        if padding is not None:  # a mask broadcast over the batch
            padding = padding.expand(query.shape[0], -1)
        if padding is not None and padding.shape[-1] < key.shape[2]:  # keys a static cache has not filled
            key, value = key[:, :, : padding.shape[-1]], value[:, :, : padding.shape[-1]]
        num_keys = key.shape[2]
        pools_grid = VARIANTS[variant].multi_scale and not causal and query.shape[2] == num_keys
        grid = _grid(config, num_keys) if pools_grid else None
        options = _config(variant, query.shape[1], causal, grid, **settings)
        if scaling is not None and not math.isclose(scaling, query.shape[-1] ** -0.5):
            if options.bn or options.kernel != "softmax":
                raise ValueError(f"{PREFIX}{variant} fixes its own scale (1/sqrt(D) after BN, none for the "
                                 f"linear kernel); the model asks for scaling={scaling}")
            query = query * (scaling * math.sqrt(query.shape[-1]))
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
