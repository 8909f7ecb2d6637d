"""Quantization: the quantizer contract and registry (``base``), the methods (one file per family)."""

from lowbit.quant.base import Quantizer, QuantizerSpec, get_quantizer, quantizers, register_quantizer

__all__ = ["Quantizer", "QuantizerSpec", "get_quantizer", "quantizers", "register_quantizer"]
