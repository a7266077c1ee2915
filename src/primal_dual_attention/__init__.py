"""primal-dual-attention: attention as the dual form of a support vector regression.

See ``SPEC.md``-style docs in ``docs/`` for the formulas; :mod:`.functional` holds the math and
:class:`MultiHeadAttention` the drop-in layer.
"""

from primal_dual_attention import functional
from primal_dual_attention.attention import (
    PAPER_VARIANTS,
    VARIANTS,
    AttentionConfig,
    AttentionVariant,
    MultiHeadAttention,
    get_variant,
)
from primal_dual_attention.causal import DecodingCache
from primal_dual_attention.functional import KERNELS, AttentionOptions, attention

__all__ = [
    "KERNELS",
    "PAPER_VARIANTS",
    "VARIANTS",
    "AttentionConfig",
    "AttentionOptions",
    "AttentionVariant",
    "DecodingCache",
    "MultiHeadAttention",
    "attention",
    "functional",
    "get_variant",
]
__version__ = "0.1.0"
