"""Quantized weights: 4-bit weight-only layers for CPU decoding."""

from .int4 import Int4Linear, quantize_model_int4, quantize_model_int8

__all__ = ["Int4Linear", "quantize_model_int4", "quantize_model_int8"]
