"""Encoders built on :class:`primal_dual_attention.MultiHeadAttention`."""

from primal_dual_attention.models.decoder import DecoderBlock, DecoderLM
from primal_dual_attention.models.encoder import EncoderBlock, TransformerEncoder
from primal_dual_attention.models.timeseries import TimeSeriesTransformer

__all__ = ["DecoderBlock", "DecoderLM", "EncoderBlock", "TimeSeriesTransformer", "TransformerEncoder"]
