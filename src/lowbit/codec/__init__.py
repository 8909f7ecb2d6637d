"""Deep Compression's coding stage: the sparse format with relative indices, canonical Huffman coding,
and the ``.lbz`` container that stores a pruned, weight-shared model and rebuilds it bit-exactly.

    from lowbit.codec import CompressedTensor, save, load
    report = save("model.lbz", {"fc1.weight": CompressedTensor(...), "fc1.bias": bias}, meta={...})
    print(report)                      # the paper's per-layer table: kept %, weight/index bits P+Q -> +H
    tensors, meta = load("model.lbz")  # dense torch tensors
    model, meta = load_model("model.lbz")  # a whole registered model saved with save_model

References:
    Han, Mao, Dally, "Deep Compression: Compressing Deep Neural Networks with Pruning, Trained
    Quantization and Huffman Coding", arXiv:1510.00149.
"""

from lowbit.codec._errors import CodecError
from lowbit.codec.container import RAW_DTYPES, CompressedTensor, load, read_report, save
from lowbit.codec.huffman import HuffmanCode, bits_per_symbol, code_lengths, entropy_bits
from lowbit.codec.model import load_model, save_model
from lowbit.codec.report import CodecReport, TensorReport
from lowbit.codec.sparse import decode_positions, encode_positions

__all__ = [
    "CodecError", "CompressedTensor", "save_model", "load_model",
    "CodecReport", "TensorReport", "RAW_DTYPES", "save", "load", "read_report",
    "HuffmanCode", "code_lengths", "entropy_bits", "bits_per_symbol", "encode_positions", "decode_positions",
]
