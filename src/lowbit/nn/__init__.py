"""Quantized drop-in layers: ``QuantConv2d``, ``QuantLinear`` (subclasses of the float layers with explicit
``weight_quantizer=`` / ``input_quantizer=``) and ``QuantAct``; with no quantizers they are the float layers."""

from lowbit.nn.layers import QuantAct, QuantConv2d, QuantLinear
from lowbit.nn.recurrent import QuantGRU, QuantLSTM

__all__ = ["QuantAct", "QuantConv2d", "QuantLinear", "QuantGRU", "QuantLSTM"]
