"""``MultiHeadAttention``, the named attention variants and :class:`AttentionConfig` (SPEC.md §1-§2).

The module owns the projections; the math lives in :mod:`primal_dual_attention.functional`.
A variant is a preset of three independent switches (kernel, Attention-BN, Attention-SH) plus
whether it needs a sparse window, so every combination is one entry of :data:`VARIANTS`.
An :class:`AttentionConfig` (a variant and its settings) is the one value that encoders, task
models and the timm integration take and hand down to the layer.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor, nn

from primal_dual_attention.causal import DecodingCache, causal_attention, decode
from primal_dual_attention.functional import (
    AttentionOptions,
    HeadGroup,
    check_head_scales,
    check_key_padding_mask,
    check_option_names,
    check_positive_int,
    check_probability,
    default_head_scales,
    get_kernel,
    grouped_attention,
    head_groups,
    packed_attention,
    packs_heads,
    pool_tokens,
    split_heads,
    with_switches,
)


@dataclass(frozen=True)
class AttentionVariant:
    """A named preset: which kernel, and whether BN / SH / a sparse window are on."""

    name: str
    kernel: str
    bn: bool = False
    multi_scale: bool = False
    sparse: bool = False
    formula: str = ""

    @property
    def supports_grid(self) -> bool:
        """Whether the variant applies to a 2-D token grid (a 1-D sparse window does not)."""
        return not self.sparse


VARIANTS: dict[str, AttentionVariant] = {
    v.name: v
    for v in (
        AttentionVariant("softmax", "softmax",
                         formula="softmax(q k^T / sqrt(D)) v"),
        AttentionVariant("linear", "linear",
                         formula="Phi(q) (Phi(k)^T v) / (Phi(q) sum_j Phi(k_j)), Phi = elu + 1"),
        AttentionVariant("sparse", "softmax", sparse=True,
                         formula="softmax over keys with |i - j| <= window"),
        AttentionVariant("bn", "softmax", bn=True,
                         formula="softmax(q^ k^T^ / sqrt(D)) v, x^ = (x - mu_k) / s_k"),
        AttentionVariant("sh", "softmax", multi_scale=True,
                         formula="head h: softmax(q pool_s(k)^T / sqrt(D)) pool_s(v)"),
        AttentionVariant("bn_sh", "softmax", bn=True, multi_scale=True,
                         formula="SH, then BN with the pooled keys' statistics"),
        AttentionVariant("linear_bn", "linear", bn=True,
                         formula="linear kernel on BN-normalised q, k"),
        AttentionVariant("linear_sh", "linear", multi_scale=True,
                         formula="linear kernel on pooled k, v per head"),
        AttentionVariant("linear_bn_sh", "linear", bn=True, multi_scale=True,
                         formula="linear kernel, pooled k, v, BN with pooled statistics"),
    )
}


def variant_names(keep: Callable[[AttentionVariant], bool] = lambda variant: True) -> tuple[str, ...]:
    """Names of the variants that ``keep`` accepts, in registry order."""
    return tuple(name for name, variant in VARIANTS.items() if keep(variant))


#: The paper's four attentions: softmax, BN, SH and BN+SH (softmax kernel, no window).
PAPER_VARIANTS = variant_names(lambda v: v.kernel == "softmax" and not v.sparse)
#: The paper's four plus the baselines it compares with: linear, sparse and linear with BN.
STUDIED_VARIANTS = variant_names(lambda v: not (v.kernel == "linear" and v.multi_scale))


def get_variant(name: str) -> AttentionVariant:
    """Look up a variant by name, or raise a ``ValueError`` listing the valid names."""
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {name!r}") from None


@dataclass(frozen=True, kw_only=True)
class AttentionConfig(AttentionOptions):
    """A variant and its settings: the one attention value models take (SPEC.md §2).

    ``AttentionConfig(variant="bn_sh", head_scales=(1, 2, 4, 8))``; the variant sets ``kernel``
    and ``bn`` (not given by hand), the other fields are those of
    :class:`~primal_dual_attention.functional.AttentionOptions`, so the config is itself the
    options every attention function takes. Every mistake that does not depend on the input is
    reported on construction, one message each; :meth:`for_heads` adds the check against the
    number of heads and fills in the default SH scales.
    """

    variant: str = "softmax"
    kernel: str = field(default="softmax", init=False)
    bn: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        spec = get_variant(self.variant)
        object.__setattr__(self, "kernel", spec.kernel)
        object.__setattr__(self, "bn", spec.bn)
        if self.head_scales is not None and not spec.multi_scale:
            raise ValueError(
                f"head_scales is only used by the SH variants "
                f"{list(variant_names(lambda v: v.multi_scale))}, got variant={self.variant!r}")
        if spec.sparse and self.window is None:
            raise ValueError(f"variant {self.variant!r} needs window=w (query i sees |i - j| <= w)")
        if not spec.supports_grid and self.grid_size is not None:
            raise ValueError(f"variant {self.variant!r} is a 1-D window over token positions and takes no "
                             f"2-D grid; got grid_size={self.grid_size}")
        if spec.multi_scale and self.window is not None:
            raise ValueError(
                f"window (sparse attention) cannot be combined with the SH variant {self.variant!r}: "
                f"pooled keys have no token positions; got window={self.window}")
        super().__post_init__()

    @property
    def spec(self) -> AttentionVariant:
        return VARIANTS[self.variant]

    def for_heads(self, num_heads: int) -> AttentionConfig:
        """This config for a layer of ``num_heads`` heads: SH scales checked or defaulted."""
        num_heads = check_positive_int("num_heads", num_heads)
        if not self.spec.multi_scale:
            return self
        if self.head_scales is None:
            scales = default_head_scales(num_heads, self.grid_size)
            if max(scales) == 1:
                where = f"a grid of {self.grid_size}" if self.grid_size else f"{num_heads} head"
                warnings.warn(f"variant {self.variant!r}: the default SH scales for {where} are all 1 (no "
                              f"head pools, so it runs as its variant without SH); pass head_scales to pool",
                              stacklevel=2)
            return replace(self, head_scales=scales)
        check_head_scales(self.head_scales, num_heads)
        return self


def attention_config(attention: AttentionConfig | str | None = None, **switches: object) -> AttentionConfig:
    """An :class:`AttentionConfig` from a config, a variant name or nothing (softmax), with the
    named fields replaced; an unknown field is an error listing the valid ones."""
    if attention is None or isinstance(attention, str):  # one construction: "sparse" needs its window
        check_option_names(AttentionConfig, switches)
        return AttentionConfig(**{"variant": attention or "softmax", **switches})
    if not isinstance(attention, AttentionConfig):
        raise TypeError(f"attention must be an AttentionConfig, a variant name or None, "
                        f"got {type(attention).__name__}")
    return with_switches(attention, switches)


class MultiHeadAttention(nn.Module):
    """Batch-first multi-head self-attention with every primal-dual variant (SPEC.md §2).

    ``MultiHeadAttention(dim, num_heads, attention)`` with an :class:`AttentionConfig` (or a
    variant name), or its fields as keywords: ``MultiHeadAttention(128, 8, variant="bn_sh")``.
    ``forward(x, key_padding_mask=None, need_weights=False)`` takes ``x`` of shape
    ``(B, N, dim)`` and a ``(B, N)`` bool mask (True = padding); it returns ``(B, N, dim)``, or
    ``(out, weights)`` with ``(B, H, N, N)`` maps when ``need_weights``. One projection makes
    q, k and v for every head, as in softmax attention; each SH head group then pools its keys
    and values together in one call (SPEC.md §2), which keeps the number of dispatched
    operations, the cost of a small model, close to softmax's. With ``causal=True`` output i is
    the layer on the prefix 1..i (:mod:`.causal`), and ``forward(x_new, cache=cache)`` with a
    :class:`~.causal.DecodingCache` decodes the next tokens incrementally. The ``qkv`` / ``proj``
    parameter layout matches timm and ``torch.nn.MultiheadAttention`` (q, k, v rows stacked).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attention: AttentionConfig | str | None = None,
        *,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **switches: object,
    ) -> None:
        super().__init__()
        dim = check_positive_int("dim", dim)
        num_heads = check_positive_int("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.config = attention_config(attention, **switches).for_heads(num_heads)
        attn_drop = check_probability("attn_drop", attn_drop)
        proj_drop = check_probability("proj_drop", proj_drop)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.attn_drop = attn_drop
        self.groups = head_groups(self.config.head_scales, num_heads)
        factory = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, **factory)
        self.proj_drop = nn.Dropout(proj_drop)

    @property
    def spec(self) -> AttentionVariant:
        return self.config.spec

    @property
    def variant(self) -> str:
        return self.config.variant

    @property
    def head_scales(self) -> tuple[int, ...] | None:
        return self.config.head_scales

    @property
    def fused_attn(self) -> bool:
        """timm's name for the fused/math switch (``AttentionConfig.fused``)."""
        return self.config.fused

    @fused_attn.setter
    def fused_attn(self, fused: bool) -> None:
        self.config = replace(self.config, fused=fused)

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, need_weights: bool = False,
        cache: DecodingCache | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, N, dim={self.dim}), got {shape}")
        batch, num_tokens, _ = x.shape
        key_padding_mask = check_key_padding_mask(key_padding_mask, batch, num_tokens)
        if key_padding_mask is not None:  # padded tokens are inert, whatever x holds (SPEC.md §2):
            x = x.masked_fill(key_padding_mask[..., None], 0.0)  # finite k, v there, no NaN gradient
        if self.config.causal or cache is not None:
            return self._causal_forward(x, key_padding_mask, need_weights, cache)
        config = self.config
        grid = config.check_input(self.num_heads, num_tokens)
        dropout_p = self.attn_drop if self.training else 0.0
        # (B, 3, H, N, hd): q, then k and v side by side, so SH pools both in one call
        qkv = self.qkv(x).view(batch, num_tokens, 3, self.num_heads, self.head_dim).permute(0, 2, 3, 1, 4)
        if packs_heads(config, num_tokens, key_padding_mask):  # every head in one call
            q, kv = qkv.split((1, 2), dim=1)
            out, weights = packed_attention(q.squeeze(1), kv, config, key_padding_mask=key_padding_mask,
                                            dropout_p=dropout_p, need_weights=need_weights)
        else:
            if config.head_scales is None:
                q, k, v = qkv.unbind(1)

                def keys_values(index: int, group: HeadGroup) -> tuple[Tensor, Tensor, Tensor | None]:
                    return k, v, key_padding_mask
            else:  # one call per head group
                q, kv = qkv.split((1, 2), dim=1)
                q, kv_parts = q.squeeze(1), split_heads(kv, self.groups, dim=2)

                def keys_values(index: int, group: HeadGroup) -> tuple[Tensor, Tensor, Tensor | None]:
                    pooled, pooled_mask = pool_tokens(
                        kv_parts[index], group.scale, key_padding_mask, grid_size=grid,
                        num_prefix_tokens=config.num_prefix_tokens)
                    return (*pooled.unbind(1), pooled_mask)

            out, weights = grouped_attention(
                q, self.groups, keys_values, config, key_padding_mask=key_padding_mask,
                num_keys=num_tokens, dropout_p=dropout_p, need_weights=need_weights)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, num_tokens, self.dim)))
        return (out, weights) if need_weights else out

    def _causal_forward(self, x: Tensor, key_padding_mask: Tensor | None, need_weights: bool,
                        cache: DecodingCache | None) -> Tensor | tuple[Tensor, Tensor]:
        """The forward of a causal layer: project, :func:`.causal.causal_attention` (or
        :func:`.causal.decode` with a ``cache``), project back."""
        if not self.config.causal:
            raise ValueError("a decoding cache needs a causal layer (AttentionConfig(causal=True))")
        batch, num_tokens, _ = x.shape  # checked by forward
        qkv = self.qkv(x).view(batch, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        weights = None
        if cache is not None:
            if need_weights:
                raise ValueError("need_weights is not available while decoding with a cache")
            cache.claim(self)
            out = decode(*qkv.unbind(0), self.config, cache, key_padding_mask)
        else:
            result = causal_attention(*qkv.unbind(0), self.config, key_padding_mask=key_padding_mask,
                                      dropout_p=self.attn_drop if self.training else 0.0,
                                      need_weights=need_weights)
            out, weights = result if need_weights else (result, None)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, num_tokens, self.dim)))
        return (out, weights) if need_weights else out

    def extra_repr(self) -> str:
        """The options that differ from their defaults (SH scales: the default ones for this many
        heads; a sparse layer's window is always shown, it has no default)."""
        parts = [f"dim={self.dim}", f"num_heads={self.num_heads}", f"variant={self.variant!r}"]
        config = self.config
        defaults = {f.name: f.default for f in fields(AttentionConfig)}
        if config.spec.multi_scale:
            defaults["head_scales"] = default_head_scales(self.num_heads, config.grid_size)
        parts += [f"{f.name}={getattr(config, f.name)!r}" for f in fields(AttentionConfig)
                  if f.init and f.name != "variant" and getattr(config, f.name) != defaults[f.name]]
        return ", ".join(parts)


def attention_layers(model: nn.Module) -> list[MultiHeadAttention]:
    """Every primal-dual attention layer of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, MultiHeadAttention)]


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in evaluation mode (no dropout) for a while, then every module back in the mode it
    was in (a submodule kept in eval mode, e.g. a frozen BatchNorm, stays so), also after an error
    (attention maps, head captures, generation)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def fused_paths(model: nn.Module, fused: bool) -> Iterator[None]:
    """Switch every softmax-kernel attention of ``model`` to the fused (SDPA) or the math path for
    a while (FLOP counting sees only the math path): this library's layers, and any other module
    with timm's ``fused_attn`` switch (timm's own ``Attention``). Layers with an exact primal form
    keep it."""
    layers = [m for m in model.modules() if hasattr(m, "fused_attn") and not (
        isinstance(m, MultiHeadAttention) and get_kernel(m.config.kernel).has_primal)]
    before = [m.fused_attn for m in layers]
    for layer in layers:
        layer.fused_attn = fused
    try:
        yield
    finally:
        for layer, value in zip(layers, before, strict=True):
            layer.fused_attn = value
