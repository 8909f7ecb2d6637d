"""lowbit's bit-packed binary inference runtime: XNOR-popcount kernels with batch norm folded into integer
thresholds, and the lowering of a trained lowbit BNN onto them.

    from lowbit.runtime.binary import pack_model
    packed = pack_model(bnn.eval())          # a QuantLinear/QuantConv2d BNN with ste_sign weights and inputs
    logits = packed(x)                       # equal to bnn(x): bit-exact binary part, same predictions

Modules: :mod:`~lowbit.runtime.binary.pack` (bit packing), :mod:`~lowbit.runtime.binary.kernels` (numba kernels),
:mod:`~lowbit.runtime.binary.model` (lowering and the packed model).
"""

from lowbit.runtime.binary.kernels import binary_conv2d, binary_gemm, maxpool2d_bits, popcnt_in_asm, popcount64
from lowbit.runtime.binary.model import PackedModel, UnsupportedModelError, pack_model
from lowbit.runtime.binary.pack import pack_bits, pack_nchw, pack_signs, unpack_bits, unpack_nhwc, unpack_signs, words

__all__ = [
    "PackedModel", "UnsupportedModelError", "binary_conv2d", "binary_gemm", "maxpool2d_bits", "pack_bits",
    "pack_model", "pack_nchw", "pack_signs", "popcnt_in_asm", "popcount64", "unpack_bits", "unpack_nhwc",
    "unpack_signs", "words",
]
