r"""Quantized recurrent layers: ``QuantLSTM`` and ``QuantGRU``, drop-in subclasses of ``nn.LSTM`` / ``nn.GRU``.

Every matrix-vector product of the recurrence goes through quantizers: the weight matrix through a
weight quantizer and the vector entering it (the layer's input :math:`x_t`, the hidden state
:math:`h_{t-1}`, and for an LSTM with ``proj_size`` the vector :math:`o_t \odot \tanh(c_t)` entering the
projection) through an input quantizer. For an LSTM (PyTorch's gate order i, f, g, o):

.. math::

    \begin{aligned}
    (i, f, g, o) &= Q_a(x_t)\,Q_w(W_{ih})^\top + b_{ih} + Q_a(h_{t-1})\,Q_w(W_{hh})^\top + b_{hh} \\
    c_t &= \sigma(f) \odot c_{t-1} + \sigma(i) \odot \tanh(g), \qquad
    h_t = \sigma(o) \odot \tanh(c_t) \quad (h_t = Q_a(h_t)\,Q_w(W_{hr})^\top \text{ with } \texttt{proj\_size}),
    \end{aligned}

and for a GRU (gate order r, z, n) with :math:`a = Q_a(x_t) Q_w(W_{ih})^\top + b_{ih}` and
:math:`u = Q_a(h_{t-1}) Q_w(W_{hh})^\top + b_{hh}`: :math:`r = \sigma(a_r + u_r)`,
:math:`z = \sigma(a_z + u_z)`, :math:`n = \tanh(a_n + r \odot u_n)`, :math:`h_t = (1 - z) \odot n + z \odot h_{t-1}`.
The cell state, the gates and the biases stay float, as in the paper.

Quantizers: ``weight_quantizer`` and ``input_quantizer`` are specs (a registered name, a mapping, an
instance, or None). Each weight matrix gets its own instance (``weight_quantizers[name]``, e.g.
``"weight_hh_l0"``; a given instance serves the first matrix, deep copies of it the others), so that
quantizers with per-tensor state (learned scales, a preconditioner) stay one per tensor;
``input_quantizers[name]`` quantizes the vector multiplied by weight ``name``. The properties
``weight_quantizer`` / ``input_quantizer`` return the first instance, so cost models read
``layer.weight_quantizer.bit_width`` as for the other quantized layers.
The layer input sequence is quantized in one call on its ``(steps * batch, features)`` matrix of vectors
(one row per vector), the hidden state at every step on its ``(batch, hidden)`` matrix.

With both quantizers None the layer calls the float layer's own (fused) ``forward`` and is
bit-identical to it. Otherwise the recurrence runs as a plain PyTorch loop over time (no fused kernel
can take quantizers inside the step); batch-first, multi-layer, bidirectional, dropout between layers,
initial states and unbatched input behave as in ``nn.LSTM`` / ``nn.GRU``. A ``PackedSequence`` is
accepted only without quantizers.

Example:
    >>> import torch
    >>> lstm = QuantLSTM(8, 16, batch_first=True, weight_quantizer={"name": "alternating", "bits": 2},
    ...                  input_quantizer={"name": "alternating", "bits": 2})
    >>> out, (h, c) = lstm(torch.randn(4, 10, 8))
    >>> out.shape, h.shape, lstm.weight_quantizer.bit_width
    (torch.Size([4, 10, 16]), torch.Size([1, 4, 16]), 2)

References:
    Xu et al., "Alternating Multi-bit Quantization for Recurrent Neural Networks", ICLR 2018,
    arXiv:1802.00150 (quantized weights and online-quantized inputs and hidden states of LSTM/GRU).
    Hou & Kwok, "Loss-aware Weight Quantization of Deep Networks", arXiv:1802.08635 (quantized LSTMs).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from lowbit.quant.base import Quantizer, QuantizerSpec, get_quantizer

__all__ = ["QuantLSTM", "QuantGRU"]


def _per_matrix(spec: QuantizerSpec, names: list[str]) -> nn.ModuleDict | None:
    """One quantizer instance per weight matrix (deep copies of the built spec), or None."""
    proto = get_quantizer(spec)
    if proto is None:
        return None
    return nn.ModuleDict({name: proto if i == 0 else copy.deepcopy(proto) for i, name in enumerate(names)})


def _first(quantizers: nn.ModuleDict | None) -> Quantizer | None:
    return None if quantizers is None else next(iter(quantizers.values()))  # type: ignore[return-value]


class _QuantRNNBase:
    """The pieces ``QuantLSTM`` and ``QuantGRU`` share (a plain base beside ``nn.LSTM``/``nn.GRU``)."""

    weight_quantizers: nn.ModuleDict | None
    input_quantizers: nn.ModuleDict | None
    _FLOAT: type[nn.RNNBase]

    def _setup_quantizers(self, weight_quantizer: QuantizerSpec, input_quantizer: QuantizerSpec) -> None:
        names = [n for n in self._flat_weights_names if n.startswith("weight_")]  # type: ignore[attr-defined]
        self.weight_quantizers = _per_matrix(weight_quantizer, names)
        self.input_quantizers = _per_matrix(input_quantizer, names)

    @property
    def weight_quantizer(self) -> Quantizer | None:
        """The quantizer of the first weight matrix (all are built from the same spec), or None."""
        return _first(self.weight_quantizers)

    @property
    def input_quantizer(self) -> Quantizer | None:
        """The quantizer of the first matmul input (all are built from the same spec), or None."""
        return _first(self.input_quantizers)

    @property
    def is_float(self) -> bool:
        return self.weight_quantizers is None and self.input_quantizers is None

    def _w(self, name: str) -> torch.Tensor:
        w = getattr(self, name)
        return w if self.weight_quantizers is None else self.weight_quantizers[name](w)

    def _q(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` (rows of vectors) as it enters the matmul with weight ``name``."""
        return x if self.input_quantizers is None else self.input_quantizers[name](x)

    def _b(self, name: str) -> torch.Tensor | None:
        return getattr(self, name) if self.bias else None  # type: ignore[attr-defined]

    def _batched(self, input: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The input with a batch dimension in the layer's layout, and whether it had one."""
        if isinstance(input, PackedSequence):
            raise NotImplementedError(
                f"{type(self).__name__}: a PackedSequence input is supported only without quantizers (the float "
                "path); pad the batch (torch.nn.utils.rnn.pad_packed_sequence) to run the quantized recurrence")
        if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):
            got = f"shape {tuple(input.shape)}" if isinstance(input, torch.Tensor) else type(input).__name__
            raise ValueError(f"{type(self).__name__}: expected a 2-D (unbatched) or 3-D (batched) input tensor, "
                             f"got {got}")
        if input.dim() == 3:
            return input, True
        return input.unsqueeze(self._batch_dim), False

    @property
    def _batch_dim(self) -> int:
        return 0 if self.batch_first else 1  # type: ignore[attr-defined]

    def _time_major(self, input: torch.Tensor) -> torch.Tensor:
        return input.transpose(0, 1) if self.batch_first else input  # type: ignore[attr-defined]

    def _finish(self, out: torch.Tensor, batched: bool) -> torch.Tensor:
        """(T, B, H) back to the layer's layout (and unbatched when the input was)."""
        out = self._time_major(out)
        return out if batched else out.squeeze(self._batch_dim)

    def _layers(self, x: torch.Tensor, states: list[Any], step_fn: Any) -> tuple[torch.Tensor, list[Any]]:
        """Run every layer and direction; ``states[l * dirs + d]`` is the initial state of that pass."""
        dirs = 2 if self.bidirectional else 1  # type: ignore[attr-defined]
        finals = []
        for layer in range(self.num_layers):  # type: ignore[attr-defined]
            outs = []
            for d in range(dirs):
                out, final = step_fn(x, states[layer * dirs + d], f"_l{layer}" + ("_reverse" if d else ""), d == 1)
                outs.append(out)
                finals.append(final)
            x = torch.cat(outs, dim=-1) if dirs == 2 else outs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:  # type: ignore[attr-defined]
                x = F.dropout(x, self.dropout, training=True)  # type: ignore[attr-defined]
        return x, finals

    def _repr_bits(self, base: str) -> str:
        def bits(q: Quantizer | None) -> str:
            return "float" if q is None else str(q.bit_width)

        return f"{base}, weight_bits={bits(self.weight_quantizer)}, input_bits={bits(self.input_quantizer)}"

    @classmethod
    def _from_float(cls, module: nn.RNNBase, weight_quantizer: QuantizerSpec,
                    input_quantizer: QuantizerSpec, **extra: Any) -> Any:
        if type(module) is not cls._FLOAT:
            raise TypeError(f"{cls.__name__}.from_float takes an nn.{cls._FLOAT.__name__}, got {type(module).__name__} "
                            "(a subclass may compute something else in its forward)")
        new = cls(module.input_size, module.hidden_size, module.num_layers, module.bias, module.batch_first,
                  module.dropout, module.bidirectional, **extra, device="meta",
                  weight_quantizer=weight_quantizer, input_quantizer=input_quantizer)
        for name in module._flat_weights_names:  # the same Parameter objects: an optimizer keeps training them
            setattr(new, name, getattr(module, name))
        new._init_flat_weights()
        for name, buf in module._buffers.items():  # e.g. pruning masks; plain recurrent layers have none
            new.register_buffer(name, buf, persistent=name not in module._non_persistent_buffers_set)
        ref = module._flat_weights[0]
        for group in (new.weight_quantizers, new.input_quantizers):
            if group is not None:
                group.to(device=ref.device, dtype=ref.dtype)
        if new.weight_quantizers is not None:  # weight-shaped quantizer parameters exist before any optimizer
            for name, q in new.weight_quantizers.items():
                q.init_from(getattr(new, name))
        new.train(module.training)
        return new


class QuantLSTM(_QuantRNNBase, nn.LSTM):
    """``nn.LSTM`` whose weight matrices and matmul inputs go through quantizers (module docstring).

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size, device,
            dtype: as for ``nn.LSTM``.
        weight_quantizer: quantizer spec of the weight matrices (one instance per matrix); None: float.
        input_quantizer: quantizer spec of the vectors entering the matmuls (inputs, hidden states);
            None: float.

    Example:
        >>> lstm = nn.LSTM(8, 16)
        >>> q = QuantLSTM.from_float(lstm)          # no quantizers: the float layer's own forward
        >>> x = torch.randn(5, 2, 8)
        >>> torch.equal(q(x)[0], lstm(x)[0])
        True
    """

    _FLOAT = nn.LSTM

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True, batch_first: bool = False,
        dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0, device: Any = None,
        dtype: torch.dtype | None = None, *, weight_quantizer: QuantizerSpec = None,
        input_quantizer: QuantizerSpec = None,
    ) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device, dtype)
        self._setup_quantizers(weight_quantizer, input_quantizer)

    @classmethod
    def from_float(cls, module: nn.LSTM, weight_quantizer: QuantizerSpec = None,
                   input_quantizer: QuantizerSpec = None) -> QuantLSTM:
        """A ``QuantLSTM`` with ``module``'s hyper-parameters, sharing its weight and bias ``Parameter``s.

        Example:
            >>> lstm = nn.LSTM(4, 8)
            >>> QuantLSTM.from_float(lstm, "alternating").weight_hh_l0 is lstm.weight_hh_l0
            True
        """
        return cls._from_float(module, weight_quantizer, input_quantizer, proj_size=module.proj_size)

    def forward(self, input: Any, hx: tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
        if self.is_float:
            return super().forward(input, hx)
        input, batched = self._batched(input)
        dirs = 2 if self.bidirectional else 1
        batch = input.shape[self._batch_dim]
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        if hx is None:
            kw = {"dtype": input.dtype, "device": input.device}
            hx = (torch.zeros(self.num_layers * dirs, batch, out_size, **kw),
                  torch.zeros(self.num_layers * dirs, batch, self.hidden_size, **kw))
        elif not batched:
            if hx[0].dim() != 2 or hx[1].dim() != 2:
                raise RuntimeError(f"For unbatched 2-D input, hx and cx should also be 2-D but got "
                                   f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        self.check_forward_args(input, hx, None)  # the float layer's checks and messages (sizes, dims)
        x = self._time_major(input)  # (T, B, F)
        states = list(zip(hx[0].unbind(0), hx[1].unbind(0), strict=True))
        out, finals = self._layers(x, states, self._lstm_pass)
        h_n = torch.stack([h for h, _ in finals])
        c_n = torch.stack([c for _, c in finals])
        if not batched:
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return self._finish(out, batched), (h_n, c_n)

    def _lstm_pass(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], sfx: str,
                   reverse: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One layer, one direction over the (T, B, F) sequence."""
        steps, batch, feat = x.shape
        ih, hh, hr = f"weight_ih{sfx}", f"weight_hh{sfx}", f"weight_hr{sfx}"
        w_hh = self._w(hh)
        w_hr = self._w(hr) if self.proj_size > 0 else None
        b_hh = self._b(f"bias_hh{sfx}")
        # the input projections of all steps at once: (T*B, F) -> (T, B, 4H)
        gates_x = F.linear(self._q(ih, x.reshape(steps * batch, feat)), self._w(ih), self._b(f"bias_ih{sfx}"))
        gates_x = gates_x.view(steps, batch, -1).unbind(0)  # unbind, not [t]: one backward for all steps
        h, c = state
        outs: list[torch.Tensor] = [h] * steps
        for t in reversed(range(steps)) if reverse else range(steps):
            gates = gates_x[t] + F.linear(self._q(hh, h), w_hh, b_hh)  # (B, 4H)
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            if w_hr is not None:
                h = F.linear(self._q(hr, h), w_hr)  # (B, proj_size)
            outs[t] = h
        return torch.stack(outs), (h, c)

    def extra_repr(self) -> str:
        return self._repr_bits(super().extra_repr())


class QuantGRU(_QuantRNNBase, nn.GRU):
    """``nn.GRU`` whose weight matrices and matmul inputs go through quantizers (module docstring).

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, device, dtype: as for
            ``nn.GRU``.
        weight_quantizer: quantizer spec of the weight matrices (one instance per matrix); None: float.
        input_quantizer: quantizer spec of the vectors entering the matmuls (inputs, hidden states);
            None: float.

    Example:
        >>> gru = QuantGRU(8, 16, weight_quantizer={"name": "alternating", "bits": 3})
        >>> out, h = gru(torch.randn(5, 2, 8))
        >>> out.shape, h.shape
        (torch.Size([5, 2, 16]), torch.Size([1, 2, 16]))
    """

    _FLOAT = nn.GRU

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True, batch_first: bool = False,
        dropout: float = 0.0, bidirectional: bool = False, device: Any = None, dtype: torch.dtype | None = None,
        *, weight_quantizer: QuantizerSpec = None, input_quantizer: QuantizerSpec = None,
    ) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype)
        self._setup_quantizers(weight_quantizer, input_quantizer)

    @classmethod
    def from_float(cls, module: nn.GRU, weight_quantizer: QuantizerSpec = None,
                   input_quantizer: QuantizerSpec = None) -> QuantGRU:
        """A ``QuantGRU`` with ``module``'s hyper-parameters, sharing its weight and bias ``Parameter``s."""
        return cls._from_float(module, weight_quantizer, input_quantizer)

    def forward(self, input: Any, hx: torch.Tensor | None = None) -> Any:
        if self.is_float:
            return super().forward(input, hx)
        input, batched = self._batched(input)
        dirs = 2 if self.bidirectional else 1
        if hx is None:
            hx = torch.zeros(self.num_layers * dirs, input.shape[self._batch_dim], self.hidden_size,
                             dtype=input.dtype, device=input.device)
        elif not batched:
            if hx.dim() != 2:
                raise RuntimeError(f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
            hx = hx.unsqueeze(1)
        self.check_forward_args(input, hx, None)  # the float layer's checks and messages (sizes, dims)
        out, finals = self._layers(self._time_major(input), list(hx.unbind(0)), self._gru_pass)
        h_n = torch.stack(finals)
        return self._finish(out, batched), (h_n if batched else h_n.squeeze(1))

    def _gru_pass(self, x: torch.Tensor, h: torch.Tensor, sfx: str, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer, one direction over the (T, B, F) sequence."""
        steps, batch, feat = x.shape
        ih, hh = f"weight_ih{sfx}", f"weight_hh{sfx}"
        w_hh, b_hh = self._w(hh), self._b(f"bias_hh{sfx}")
        gates_x = F.linear(self._q(ih, x.reshape(steps * batch, feat)), self._w(ih), self._b(f"bias_ih{sfx}"))
        gates_x = gates_x.view(steps, batch, -1).unbind(0)  # T x (B, 3H); unbind: one backward for all steps
        outs: list[torch.Tensor] = [h] * steps
        for t in reversed(range(steps)) if reverse else range(steps):
            a_r, a_z, a_n = gates_x[t].chunk(3, dim=1)
            u_r, u_z, u_n = F.linear(self._q(hh, h), w_hh, b_hh).chunk(3, dim=1)
            r = torch.sigmoid(a_r + u_r)
            z = torch.sigmoid(a_z + u_z)
            n = torch.tanh(a_n + r * u_n)
            h = (1 - z) * n + z * h
            outs[t] = h
        return torch.stack(outs), h

    def extra_repr(self) -> str:
        return self._repr_bits(super().extra_repr())
