"""Quantization: the quantizer contract and registry (``base``), the methods (one file per family)."""

from lowbit.quant.affine import AffineQuantizer, Int8WeightQuantizer, Uint8ActQuantizer  # noqa: F401 (registers)
from lowbit.quant.alternating import AlternatingQuant  # noqa: F401 (registers alternating)
from lowbit.quant.api import LayerQuant, QuantConfig, QuantReport, quantize_
from lowbit.quant.base import Quantizer, QuantizerSpec, get_quantizer, quantizers, register_quantizer
from lowbit.quant.binary import BnnPlusRegularizer, ClipWeights, SteSign, StochasticSign, SwishSign  # noqa: F401
from lowbit.quant.dorefa import DorefaAct, DorefaGrad, DorefaWeight  # noqa: F401 (registers dorefa_*)
from lowbit.quant.loss_aware import LAB, LAQLinear, LAQLog, LAQTernary, LossAware  # noqa: F401 (registers)
from lowbit.quant.lqnets import LQNetsAct, LQNetsWeight  # noqa: F401 (registers lqnets_weight, lqnets_act)
from lowbit.quant.polino import BucketedPoints, BucketedUniform  # noqa: F401 (registers bucketed_*)
from lowbit.quant.qil import QILAct, QILWeight  # noqa: F401 (registers qil_weight, qil_act)
from lowbit.quant.ternary import TTQ, TWN  # noqa: F401 (registers twn, ttq)

__all__ = ["Quantizer", "QuantizerSpec", "get_quantizer", "quantizers", "register_quantizer",
           "LayerQuant", "QuantConfig", "QuantReport", "quantize_"]
