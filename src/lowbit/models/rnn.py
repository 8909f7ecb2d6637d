"""Character-level language models: Embedding -> LSTM / GRU stack -> Linear, as in char-rnn.

Tokens (B, T) int64 -> embedding (B, T, E) -> ``layers`` recurrent layers of ``hidden`` units
(batch-first ``nn.LSTM`` / ``nn.GRU``, dropout between layers) -> dropout -> Linear to the vocabulary
-> logits (B, T, V). ``num_classes`` is the vocabulary size (65 characters for tinyshakespeare);
``embed_dim`` defaults to ``hidden``. The recurrent state starts at zero for every batch (the training
engine feeds independent windows). With the defaults the LSTM has 4.27M parameters, the GRU 3.22M.

References:
    Karpathy, Johnson & Fei-Fei, "Visualizing and Understanding Recurrent Networks", arXiv:1506.02078
    (char-rnn and the tinyshakespeare corpus).
    Hochreiter & Schmidhuber, "Long Short-Term Memory", Neural Computation 1997.
    Cho et al., "Learning Phrase Representations using RNN Encoder-Decoder" (GRU), arXiv:1406.1078.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models._layers import check_positive_int
from lowbit.models._registry import register_model

__all__ = ["CharRNN", "char_lstm", "char_gru"]

_RNNS: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU}


class CharRNN(nn.Module):
    def __init__(
        self, cell: str = "lstm", num_classes: int = 65, hidden: int = 512, layers: int = 2, dropout: float = 0.2,
        embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        if cell not in _RNNS:
            raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
        embed_dim = hidden if embed_dim is None else embed_dim
        for name, value in (("num_classes", num_classes), ("hidden", hidden), ("layers", layers)):
            check_positive_int(name, value)
        check_positive_int("embed_dim", embed_dim)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.embed = nn.Embedding(num_classes, embed_dim)
        # nn.LSTM/GRU apply dropout only between layers; it warns when there is no such layer
        self.rnn = _RNNS[cell](embed_dim, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x))  # (B, T) -> (B, T, E) -> (B, T, hidden)
        return self.fc(self.dropout(out))  # (B, T, vocab)


_PAPER = "Visualizing and Understanding Recurrent Networks (char-rnn), arXiv:1506.02078"


@register_model((128,), "tinyshakespeare", _PAPER)
def char_lstm(
    num_classes: int = 65, hidden: int = 512, layers: int = 2, dropout: float = 0.2, embed_dim: int | None = None
) -> nn.Module:
    return CharRNN("lstm", num_classes, hidden, layers, dropout, embed_dim)


@register_model((128,), "tinyshakespeare", _PAPER)
def char_gru(
    num_classes: int = 65, hidden: int = 512, layers: int = 2, dropout: float = 0.2, embed_dim: int | None = None
) -> nn.Module:
    return CharRNN("gru", num_classes, hidden, layers, dropout, embed_dim)
