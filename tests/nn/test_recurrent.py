"""QuantLSTM / QuantGRU against nn.LSTM / nn.GRU: the float path bit-identical, the cell loop against the fused
layers (identity quantizers), the quantized recurrence against nn.LSTMCell / nn.GRUCell fed quantized values."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from lowbit.nn import QuantGRU, QuantLSTM
from lowbit.quant import QuantConfig, Quantizer, quantize_
from lowbit.quant.alternating import AlternatingQuant, alternating_quantize


class _Identity(Quantizer):
    """Test-only: returns its input; makes a layer run its quantized cell loop with nothing quantized.

    References:
        none (a test double), arXiv:0000.00000.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Counting(Quantizer):
    """Test-only: the identity, counting the calls and recording the shapes it saw.

    References:
        none (a test double), arXiv:0000.00000.
    """

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return x


FLOAT = {"lstm": nn.LSTM, "gru": nn.GRU}
QUANT = {"lstm": QuantLSTM, "gru": QuantGRU}
CONFIGS = [  # (kwargs, batched)
    ({}, True),
    ({"num_layers": 2, "batch_first": True}, True),
    ({"bidirectional": True, "num_layers": 2}, True),
    ({"bias": False, "batch_first": True}, True),
    ({"num_layers": 2}, False),
    ({"batch_first": True, "bidirectional": True}, False),
]


def _pair(cell: str, **kw: object) -> tuple[nn.RNNBase, nn.RNNBase]:
    torch.manual_seed(0)
    ref = FLOAT[cell](5, 7, **kw)
    torch.manual_seed(0)
    q = QUANT[cell](5, 7, **kw)
    return ref, q


def _input(kw: dict[str, object], batched: bool, steps: int = 6, batch: int = 3) -> torch.Tensor:
    if not batched:
        return torch.randn(steps, 5)
    return torch.randn(batch, steps, 5) if kw.get("batch_first") else torch.randn(steps, batch, 5)


def _flatten(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flatten(o)]  # type: ignore[attr-defined]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize(("kw", "batched"), CONFIGS)
def test_no_quantizers_is_bit_identical_to_the_float_layer(cell: str, kw: dict[str, object], batched: bool) -> None:
    ref, q = _pair(cell, **kw)
    assert isinstance(q, FLOAT[cell]) and q.weight_quantizer is None and q.input_quantizer is None
    x = _input(kw, batched)
    for a, b in zip(_flatten(ref(x)), _flatten(q(x)), strict=True):
        assert torch.equal(a, b)
    fq = QUANT[cell].from_float(ref)  # from_float too
    for a, b in zip(_flatten(ref(x)), _flatten(fq(x)), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize(("kw", "batched"), CONFIGS)
def test_cell_loop_matches_the_fused_layer_outputs_and_gradients(cell: str, kw: dict[str, object],
                                                                  batched: bool) -> None:
    ref, _ = _pair(cell, **kw)
    q = QUANT[cell].from_float(copy.deepcopy(ref), _Identity(), _Identity())  # runs the plain-torch loop
    x = _input(kw, batched)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_q = _flatten(ref(x1)), _flatten(q(x2))
    for a, b in zip(out_ref, out_q, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    g = [torch.randn_like(t) for t in out_ref]
    sum((t * gi).sum() for t, gi in zip(out_ref, g, strict=True)).backward()
    sum((t * gi).sum() for t, gi in zip(out_q, g, strict=True)).backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=1e-5)
    for (name, p_ref), (_, p_q) in zip(ref.named_parameters(), q.named_parameters(), strict=True):
        torch.testing.assert_close(p_q.grad, p_ref.grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_initial_state_is_used_as_by_the_float_layer(cell: str) -> None:
    ref, _ = _pair(cell, num_layers=2, bidirectional=True)
    q = QUANT[cell].from_float(copy.deepcopy(ref), _Identity(), None)
    x = torch.randn(4, 3, 5)
    h0 = torch.randn(4, 3, 7)
    hx = (h0, torch.randn(4, 3, 7)) if cell == "lstm" else h0
    for a, b in zip(_flatten(ref(x, hx)), _flatten(q(x, hx)), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_lstm_with_projection_matches_and_quantizes_the_projection() -> None:
    torch.manual_seed(0)
    ref = nn.LSTM(5, 7, num_layers=2, proj_size=3, batch_first=True)
    q = QuantLSTM.from_float(copy.deepcopy(ref), _Identity(), _Identity())
    x = torch.randn(2, 4, 5)
    for a, b in zip(_flatten(ref(x)), _flatten(q(x)), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert set(q.weight_quantizers) == {f"weight_{k}_l{i}" for k in ("ih", "hh", "hr") for i in (0, 1)}


def _quantized_copy(module: nn.RNNBase, bits: int) -> nn.RNNBase:
    """A float layer whose weight matrices hold their alternating quantization (the STE's forward value)."""
    ref = copy.deepcopy(module)
    with torch.no_grad():
        for name in ref._flat_weights_names:
            if name.startswith("weight_"):
                getattr(ref, name).copy_(alternating_quantize(getattr(ref, name), bits))
    return ref


def test_quantized_lstm_equals_a_cell_fed_quantized_weights_inputs_and_states() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 8, batch_first=True)
    q = QuantLSTM.from_float(lstm, {"name": "alternating", "bits": 2}, {"name": "alternating", "bits": 3})
    x = torch.randn(3, 6, 5)
    out, (h_n, c_n) = q(x)
    ref = _quantized_copy(lstm, 2)
    cell = nn.LSTMCell(5, 8)
    with torch.no_grad():
        for a, b in (("weight_ih", "weight_ih_l0"), ("weight_hh", "weight_hh_l0"), ("bias_ih", "bias_ih_l0"),
                     ("bias_hh", "bias_hh_l0")):
            getattr(cell, a).copy_(getattr(ref, b))
    h = c = torch.zeros(3, 8)
    outs = []
    for t in range(6):  # the paper's recurrence: quantize x_t and h_{t-1} online, the cell state stays float
        h, c = cell(alternating_quantize(x[:, t], 3), (alternating_quantize(h, 3), c))
        outs.append(h)
    torch.testing.assert_close(out, torch.stack(outs, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_n[0], h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_n[0], c, atol=1e-5, rtol=1e-5)


def test_quantized_gru_equals_a_cell_fed_quantized_weights_inputs_and_states() -> None:
    torch.manual_seed(0)
    gru = nn.GRU(5, 8)
    q = QuantGRU.from_float(gru, {"name": "alternating", "bits": 3}, {"name": "alternating", "bits": 2})
    x = torch.randn(6, 3, 5)
    out, h_n = q(x)
    ref = _quantized_copy(gru, 3)
    cell = nn.GRUCell(5, 8)
    with torch.no_grad():
        for a in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, a).copy_(getattr(ref, a + "_l0"))
    h = torch.zeros(3, 8)
    outs = []
    for t in range(6):
        # GRUCell uses h both in the matmul and in the update z*h: split them as the paper's layer does
        hq = alternating_quantize(h, 2)
        gx = nn.functional.linear(alternating_quantize(x[t], 2), cell.weight_ih, cell.bias_ih).chunk(3, 1)
        gh = nn.functional.linear(hq, cell.weight_hh, cell.bias_hh).chunk(3, 1)
        r, z = torch.sigmoid(gx[0] + gh[0]), torch.sigmoid(gx[1] + gh[1])
        h = (1 - z) * torch.tanh(gx[2] + r * gh[2]) + z * h
        outs.append(h)
    torch.testing.assert_close(out, torch.stack(outs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_n[0], h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_weight_gradient_is_straight_through(cell: str) -> None:
    """The latent weights get exactly the gradient the quantized weights get in a float layer."""
    torch.manual_seed(0)
    layer = FLOAT[cell](4, 6, num_layers=2)
    q = QUANT[cell].from_float(copy.deepcopy(layer), {"name": "alternating", "bits": 2})
    ref = _quantized_copy(layer, 2)
    x = torch.randn(5, 2, 4)
    g = torch.randn(5, 2, 6)
    (q(x)[0] * g).sum().backward()
    (ref(x)[0] * g).sum().backward()
    for (name, p_q), (_, p_ref) in zip(q.named_parameters(), ref.named_parameters(), strict=True):
        assert p_q.grad is not None and torch.isfinite(p_q.grad).all(), name
        torch.testing.assert_close(p_q.grad, p_ref.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_one_quantizer_instance_per_matrix_and_the_vectors_each_sees() -> None:
    proto = _Counting()
    q = QuantLSTM(3, 4, num_layers=2, batch_first=True, weight_quantizer=AlternatingQuant(2), input_quantizer=proto)
    names = ["weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1"]
    assert list(q.weight_quantizers) == names and list(q.input_quantizers) == names
    assert len({id(m) for m in q.weight_quantizers.values()}) == 4  # separate instances
    assert q.weight_quantizer.bit_width == 2 and q.input_quantizer is proto  # the first one, for cost models
    q(torch.randn(2, 5, 3))  # batch 2, 5 steps
    seen = {n: m.shapes for n, m in q.input_quantizers.items()}
    assert seen["weight_ih_l0"] == [(10, 3)]  # the whole input sequence, one row per (step, sample) vector
    assert seen["weight_hh_l0"] == [(2, 4)] * 5  # the hidden state, online at every step
    assert seen["weight_ih_l1"] == [(10, 4)] and seen["weight_hh_l1"] == [(2, 4)] * 5
    assert "weight_bits=2" in repr(q) and "input_bits=32" in repr(q)


def test_from_float_shares_parameters_and_checks_the_type() -> None:
    lstm = nn.LSTM(3, 4, num_layers=2).train(False)
    q = QuantLSTM.from_float(lstm, "alternating", "alternating")
    assert all(getattr(q, n) is getattr(lstm, n) for n in lstm._flat_weights_names)
    assert not q.training
    assert [p for p in q.parameters()] == [p for p in lstm.parameters()]  # the quantizers add no parameters
    with pytest.raises(TypeError, match="takes an nn.LSTM, got GRU"):
        QuantLSTM.from_float(nn.GRU(3, 4))
    with pytest.raises(TypeError, match="takes an nn.GRU, got QuantGRU"):
        QuantGRU.from_float(QuantGRU(3, 4))
    with pytest.raises(KeyError, match="alternating"):  # an unknown quantizer name lists the known ones
        QuantLSTM(3, 4, weight_quantizer="no_such_quantizer")


def test_state_dict_has_the_float_layer_keys_and_round_trips() -> None:
    torch.manual_seed(0)
    q = QuantLSTM(3, 4, weight_quantizer="alternating", input_quantizer="alternating")
    plain = nn.LSTM(3, 4)
    assert set(q.state_dict()) == set(plain.state_dict())  # alternating quantizers keep no state
    fresh = QuantLSTM(3, 4, weight_quantizer="alternating", input_quantizer="alternating")
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(5, 2, 3)
    assert torch.equal(fresh(x)[0], q(x)[0])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bad_inputs_raise_clear_errors(cell: str) -> None:
    q = QUANT[cell](5, 7, weight_quantizer="alternating")
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        q(torch.randn(4, 2, 6))
    with pytest.raises(ValueError, match="2-D \\(unbatched\\) or 3-D"):
        q(torch.randn(4, 2, 5, 1))
    with pytest.raises(RuntimeError, match="Expected hidden"):
        h0 = torch.zeros(1, 3, 7)  # batch 3, input batch 2
        q(torch.randn(4, 2, 5), (h0, h0) if cell == "lstm" else h0)
    packed = pack_padded_sequence(torch.randn(4, 2, 5), torch.tensor([4, 3]))
    with pytest.raises(NotImplementedError, match="PackedSequence"):
        q(packed)
    QUANT[cell](5, 7)(packed)  # the float path takes it, as nn.LSTM does
    with pytest.raises(ValueError, match="NaN"):  # a diverged input is refused by the quantizer
        QUANT[cell](5, 7, input_quantizer="alternating")(torch.full((4, 2, 5), float("nan")))


def test_quantize_swaps_recurrent_layers_by_name() -> None:
    from lowbit.models import create_model

    model = create_model("char_lstm", hidden=16, layers=2, num_classes=11)
    spec = {"weight": {"name": "alternating", "bits": 2}, "input": {"name": "alternating", "bits": 3}}
    report = quantize_(model, QuantConfig(rules={"rnn": spec}))
    assert isinstance(model.rnn, QuantLSTM) and model.rnn.batch_first
    assert report.quantized == ["rnn"]
    row = next(r for r in report.layers if r.name == "rnn")
    assert (row.type, row.weight_bits, row.input_bits) == ("LSTM", 2, 3)
    assert type(model.fc) is nn.Linear  # the classifier stays float (keep_first_last)
    logits = model(torch.randint(0, 11, (2, 9)))
    assert logits.shape == (2, 9, 11) and torch.isfinite(logits).all()


def test_cost_model_reads_the_bit_widths_and_counts_the_float_macs() -> None:
    from lowbit.hw import profile
    from lowbit.models import create_model

    model = create_model("char_lstm", hidden=16, layers=2, num_classes=11)
    before = {r.name: r for r in profile(model, (9,)).layers}["rnn"]
    spec = {"weight": {"name": "alternating", "bits": 2}, "input": {"name": "alternating", "bits": 3}}
    quantize_(model, QuantConfig(rules={"rnn": spec}))
    after = {r.name: r for r in profile(model, (9,)).layers}["rnn"]
    assert (after.weight_bits, after.act_bits) == (2, 3) and (before.weight_bits, before.act_bits) == (32, 32)
    assert after.macs == before.macs == 9 * 2 * 4 * 16 * (16 + 16)  # 9 steps, 2 layers, 4 gates, input 16 + 16


def test_a_saved_quantized_char_lstm_is_rebuilt_by_load_model(tmp_path: Path) -> None:
    from lowbit.models import create_model
    from lowbit.train import save_model
    from lowbit.train.checkpoint import load_model

    model = create_model("char_lstm", hidden=16, layers=1, num_classes=11)
    spec = {"weight": {"name": "alternating", "bits": 3}, "input": {"name": "alternating", "bits": 2}}
    quantize_(model, QuantConfig(rules={"rnn": spec}))
    path = save_model(tmp_path / "m.safetensors", model.eval())
    loaded, _ = load_model(path)  # replays the recorded quantize_ on a fresh char_lstm
    assert isinstance(loaded.rnn, QuantLSTM) and loaded.rnn.weight_quantizer.bit_width == 3
    x = torch.randint(0, 11, (2, 7))
    assert torch.equal(loaded.eval()(x), model(x))
