"""Encoders built on :class:`primal_dual_attention.MultiHeadAttention`."""

from primal_dual_attention.models.encoder import EncoderBlock, TransformerEncoder
from primal_dual_attention.models.timeseries import TimeSeriesTransformer

__all__ = ["EncoderBlock", "TimeSeriesTransformer", "TransformerEncoder"]
