"""lowbit.hw.counts: MACs, parameters, bit widths, BOPs, storage and sparsity against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from lowbit.hw import LayerStats, ModelStats, profile
from lowbit.models import create_model, list_models


def _conv_out(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    """The output length from the convolution arithmetic (Dumoulin & Visin, arXiv:1603.07285)."""
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


# (in_ch, out_ch, kernel, stride, padding, dilation, groups, H, W)
CONV_CASES = {
    "plain": (3, 8, 3, 1, 0, 1, 1, 10, 12),
    "groups2": (4, 6, 3, 1, 1, 1, 2, 9, 9),
    "depthwise": (8, 8, 3, 1, 1, 1, 8, 10, 10),
    "dilation2": (3, 5, 3, 1, 0, 2, 1, 11, 11),
    "stride2_pad": (3, 4, 5, 2, 2, 1, 1, 15, 16),
    "depthwise_multiplier_stride2_dil2": (4, 8, 3, 2, 2, 2, 4, 13, 13),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_macs_by_hand(case: str) -> None:
    cin, cout, k, s, p, d, g, h, w = CONV_CASES[case]
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g)
    stats = profile(conv, (cin, h, w))
    ho, wo = _conv_out(h, k, s, p, d), _conv_out(w, k, s, p, d)
    # each output value is a dot product over its group's input channels and the kernel window
    expected = ho * wo * cout * (cin // g) * k * k
    (layer,) = stats.layers
    assert layer.output_shape == (1, cout, ho, wo)
    assert layer.macs == expected
    assert layer.params == cout * (cin // g) * k * k + cout
    if g == cin:  # depthwise: one k x k filter per channel (x multiplier)
        assert layer.macs == ho * wo * cout * k * k


def test_dilation_does_not_change_macs_per_output() -> None:
    plain = profile(nn.Conv2d(3, 4, 3, padding=2), (3, 8, 8)).layers[0]
    dilated = profile(nn.Conv2d(3, 4, 3, padding=2, dilation=2), (3, 8, 8)).layers[0]
    assert dilated.output_shape == (1, 4, 8, 8) and plain.output_shape == (1, 4, 10, 10)
    assert dilated.macs / 64 == plain.macs / 100 == 3 * 9 * 4


def test_conv1d_and_transposed_conv() -> None:
    conv1d = profile(nn.Conv1d(6, 4, 5, stride=2, padding=1, groups=2), (6, 20)).layers[0]
    assert conv1d.macs == _conv_out(20, 5, 2, 1, 1) * 4 * 3 * 5
    # a transposed convolution multiplies every input value by (out / groups) * kernel weights
    tconv = profile(nn.ConvTranspose2d(4, 6, 3, stride=2), (4, 5, 5)).layers[0]
    assert tconv.output_shape == (1, 6, 11, 11)
    assert tconv.macs == 4 * 5 * 5 * 6 * 9


def test_linear_counts_leading_dims() -> None:
    stats = profile(nn.Linear(16, 8), example=torch.randn(2, 5, 16))
    assert stats.input_shape == (5, 16)
    assert stats.layers[0].macs == 2 * 5 * 16 * 8
    assert stats.layers[0].output_shape == (2, 5, 8)


def test_lstm_macs_by_hand() -> None:
    lstm = nn.LSTM(10, 20, num_layers=2, bidirectional=True, batch_first=True)
    batch, steps, hidden = 3, 7, 20
    stats = profile(lstm, example=torch.randn(batch, steps, 10))
    # per step, layer and direction: 4 gates, each hidden x (input + hidden) weights;
    # layer 0 sees the 10 input features, layer 1 the two directions of layer 0 (2 * 20)
    per_step = 2 * (4 * hidden * (10 + hidden)) + 2 * (4 * hidden * (2 * hidden + hidden))
    (layer,) = stats.layers
    assert layer.macs == batch * steps * per_step
    assert layer.output_shape == (batch, steps, 2 * hidden)
    assert layer.params == sum(p.numel() for p in lstm.parameters())
    assert layer.type == "LSTM"


def test_gru_and_rnn_macs_by_hand() -> None:
    gru = profile(nn.GRU(6, 5), example=torch.randn(9, 2, 6)).layers[0]  # (T, B, F)
    assert gru.macs == 9 * 2 * 3 * 5 * (6 + 5)
    rnn = profile(nn.RNN(6, 5, num_layers=2), example=torch.randn(4, 1, 6)).layers[0]
    assert rnn.macs == 4 * (5 * (6 + 5) + 5 * (5 + 5))
    cell = profile(nn.LSTMCell(6, 5), example=torch.randn(3, 6)).layers[0]
    assert cell.macs == 3 * 4 * 5 * (6 + 5)


@pytest.mark.filterwarnings("ignore:LSTM with projections:UserWarning")
def test_lstm_with_projection() -> None:
    lstm = nn.LSTM(8, 12, proj_size=4, batch_first=True)
    stats = profile(lstm, example=torch.randn(1, 5, 8))
    # gates see the projected state (4), then a 12 -> 4 projection
    assert stats.layers[0].macs == 5 * (4 * 12 * (8 + 4) + 12 * 4)


class TinyLM(nn.Module):
    """Embedding -> LSTM -> head whose weight is tied to the embedding's."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, vocab)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(x))[0])


def test_language_model_input_embedding_and_tied_weights() -> None:
    model = TinyLM()
    stats = profile(model, (12,))
    rows = {layer.name: layer for layer in stats.layers}
    assert rows["emb"].macs == 0 and rows["emb"].params == 50 * 16 and rows["emb"].output_shape == (1, 12, 16)
    assert rows["rnn"].macs == 12 * 4 * 16 * (16 + 16)
    assert rows["head"].macs == 12 * 16 * 50
    assert rows["head"].params == 50  # the bias; the tied weight is counted once, by the embedding
    assert stats.total_params == sum(p.numel() for p in model.parameters())


def test_module_called_twice_counts_macs_twice() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.fc(x))

    stats = profile(Twice(), example=torch.randn(1, 8))
    assert stats.total_macs == 2 * 64 and stats.total_params == 72


def test_multihead_attention_counts_projections_and_products() -> None:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    model = Attn()
    stats = profile(model, example=torch.randn(2, 5, 16))
    # q, k, v and output projections: 4 * L * E * E; QK^T and AV: 2 * L * L * E; per sequence
    assert stats.total_macs == 2 * (4 * 5 * 16 * 16 + 2 * 5 * 5 * 16)
    assert [layer.name for layer in stats.layers] == ["attn"]  # out_proj belongs to the attention row
    assert stats.total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_registered_models_param_totals(name: str) -> None:
    model = create_model(name)
    stats = profile(model)  # the input shape comes from the registry
    assert stats.total_params == sum(p.numel() for p in model.parameters())
    assert stats.total_macs > 0
    assert stats.float32_bytes == 4 * stats.total_params
    assert stats.total_storage_bytes == stats.float32_bytes  # nothing quantized: all 32-bit
    assert stats.total_bops == 32 * 32 * stats.total_macs


def test_lenet5_well_known_numbers() -> None:
    stats = profile(create_model("lenet5"))
    assert stats.input_shape == (1, 28, 28)
    assert stats.total_params == 431_080
    rows = {layer.name: layer for layer in stats.layers}
    assert rows["conv1"].macs == 24 * 24 * 20 * 25 == 288_000
    assert rows["conv2"].macs == 8 * 8 * 50 * 20 * 25  # 12x12 -> 8x8
    assert rows["fc1"].macs == 50 * 4 * 4 * 500
    assert stats.total_macs == 288_000 + 1_600_000 + 400_000 + 5_000


def test_resnet20_macs_by_independent_reasoning() -> None:
    stats = profile(create_model("resnet20"))
    # stem 3 -> 16 at 32x32; three stages of n = 3 blocks with two 3x3 convs each at 16@32x32, 32@16x16,
    # 64@8x8; the first conv of stages 2 and 3 has stride 2 and half the input channels; option A
    # shortcuts are parameter-free; the classifier is 64 -> 10; batch norm and pooling are not MACs
    expected = 32 * 32 * 16 * 3 * 9
    for width, side, in_ch in ((16, 32, 16), (32, 16, 16), (64, 8, 32)):
        expected += side * side * width * in_ch * 9  # first conv of the stage
        expected += 5 * side * side * width * width * 9  # the other five
    expected += 64 * 10
    assert stats.total_macs == expected == 40_551_040
    assert stats.total_params == 269_722  # "0.27M" in the paper's Table 6
    assert sum(layer.type == "Conv2d" for layer in stats.layers) == 19


def test_storage_and_sparsity_after_zeroing() -> None:
    model = nn.Sequential(nn.Linear(10, 4), nn.ReLU(), nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        model[0].weight[:2] = 0  # 20 of 40 weights
    stats = profile(model, example=torch.randn(1, 10))  # (10,) alone would mean token ids
    first, second = stats.layers
    assert first.sparsity == 0.5 and second.sparsity == 0.0
    assert first.storage_bytes == 40 * 4 + 4 * 4 and second.storage_bytes == 12 * 4
    assert stats.sparsity == pytest.approx(20 / 52)
    assert [layer.name for layer in stats.layers] == ["0", "2"]  # the ReLU has nothing to count


def test_sparsity_of_torch_pruned_layer() -> None:
    model = nn.Sequential(nn.Linear(20, 10))
    prune.l1_unstructured(model[0], "weight", amount=0.3)
    stats = profile(model, example=torch.randn(1, 20))
    assert stats.layers[0].sparsity == pytest.approx(0.3)
    assert stats.total_params == 210  # weight_orig + bias; the mask is a buffer


class FakeQuantizer(nn.Module):
    """The quantizer contract, minimally: ``forward`` returns a tensor of the same shape, ``bit_width``."""

    def __init__(self, bit_width: int, learn_scale: bool = False) -> None:
        super().__init__()
        self.bit_width = bit_width
        self.scale = nn.Parameter(torch.ones(1)) if learn_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FakeQuantLinear(nn.Linear):
    def __init__(self, *args: int, weight_quantizer: nn.Module | None, input_quantizer: nn.Module | None) -> None:
        super().__init__(*args)
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_quantizer(self.weight) if self.weight_quantizer is not None else self.weight
        x = self.input_quantizer(x) if self.input_quantizer is not None else x
        return nn.functional.linear(x, w, self.bias)


def test_bops_and_storage_of_quantized_layer() -> None:
    model = nn.Sequential(
        FakeQuantLinear(32, 16, weight_quantizer=FakeQuantizer(2, learn_scale=True), input_quantizer=FakeQuantizer(4)),
        FakeQuantLinear(16, 4, weight_quantizer=FakeQuantizer(8), input_quantizer=None),
        nn.Linear(4, 2),
    )
    stats = profile(model, example=torch.randn(1, 32))
    q2, q8, fp = stats.layers
    assert (q2.weight_bits, q2.act_bits, q2.type) == (2, 4, "FakeQuantLinear")
    assert q2.macs == 512 and q2.bops == 512 * 2 * 4
    assert q2.params == 512 + 16 + 1  # the quantizer's scale belongs to the layer's row
    assert q2.storage_bytes == 512 * 2 / 8 + (16 + 1) * 4
    assert (q8.weight_bits, q8.act_bits, q8.bops) == (8, 32, 64 * 8 * 32)
    assert q8.storage_bytes == 64 + 4 * 4
    assert (fp.weight_bits, fp.act_bits, fp.bops) == (32, 32, 8 * 32 * 32)
    assert stats.total_bops == 4096 + 16384 + 8192
    assert stats.total_params == sum(p.numel() for p in model.parameters())
    assert stats.total_storage_bytes == q2.storage_bytes + q8.storage_bytes + 10 * 4


def test_quantizer_without_bit_width_is_an_error() -> None:
    layer = FakeQuantLinear(4, 2, weight_quantizer=nn.Identity(), input_quantizer=None)
    with pytest.raises(TypeError, match="bit_width"):
        profile(layer, example=torch.randn(1, 4))


def test_training_flags_restored_and_eval_during_count() -> None:
    seen: list[bool] = []

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(self.training)
            return x

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), Spy())
    model.train()
    model[1].eval()  # a frozen batch norm inside a training model keeps its own flag
    running_mean = model[1].running_mean.clone()
    profile(model, (1, 6, 6))
    assert seen == [False]
    assert model.training and model[0].training and not model[1].training and model[2].training
    assert torch.equal(model[1].running_mean, running_mean)
    model.eval()
    profile(model, (1, 6, 6))
    assert not any(m.training for m in model.modules())


def test_input_shape_required_without_registry_name() -> None:
    with pytest.raises(ValueError, match="input_shape"):
        profile(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="does not match"):
        profile(nn.Linear(3, 3), (4,), example=torch.randn(1, 3))


def test_one_element_shape_means_token_ids() -> None:
    seen: list[torch.Tensor] = []
    emb = nn.Embedding(10, 4)
    emb.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    profile(emb, (7,))
    assert seen[0].dtype == torch.int64 and seen[0].shape == (1, 7) and not seen[0].any()


def test_to_dict_is_json_ready() -> None:
    stats = ModelStats(
        [LayerStats("fc", "Linear", (1, 2), 6, 4, 8, 8, 256, 8.0, 0.25, weight_params=4)], input_shape=(2,)
    )
    d = stats.to_dict()
    assert d["layers"][0]["output_shape"] == [1, 2] and d["input_shape"] == [2]
    assert d["totals"] == {
        "params": 6, "macs": 4, "bops": 256, "storage_bytes": 8.0, "float32_bytes": 24, "sparsity": 0.25,
    }


def test_quantized_wrapper_counts_its_inner_layer() -> None:
    class QuantBlock(nn.Module):
        """A quantized layer that wraps (rather than subclasses) a convolution."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, bias=False)
            self.weight_quantizer, self.input_quantizer = FakeQuantizer(1), FakeQuantizer(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    stats = profile(nn.Sequential(QuantBlock()), (2, 5, 5))
    (row,) = stats.layers
    assert (row.name, row.type, row.output_shape) == ("0", "QuantBlock", (1, 4, 3, 3))
    assert row.macs == 3 * 3 * 4 * 2 * 9 and row.bops == row.macs
    assert row.storage_bytes == 72 / 8 and row.weight_params == 72


def _needs(name: str) -> None:
    if name not in list_models():
        pytest.skip(f"{name} is not in the model registry")


def test_mobilenet_v1_224_matches_paper() -> None:
    _needs("mobilenet_v1")
    stats = profile(create_model("mobilenet_v1", imagenet=True))  # the model's own input_shape: 224x224
    assert stats.input_shape == (3, 224, 224)
    # Howard et al. Table 1: stem 3x3/2 conv to 32 channels, then (depthwise 3x3, pointwise 1x1) pairs
    side, ch = 112, 32
    expected = side * side * 32 * 3 * 9
    for out, stride in [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [
        (1024, 2), (1024, 1),
    ]:
        side //= stride
        expected += side * side * ch * 9  # depthwise: one 3x3 filter per channel
        expected += side * side * out * ch  # pointwise
        ch = out
    expected += 1024 * 1000
    assert stats.total_macs == expected
    assert round(stats.total_macs / 1e6) == 569  # "569 million mult-adds" (paper Table 8)
    depthwise = [row for row in stats.layers if row.type == "Conv2d" and row.params == row.output_shape[1] * 9]
    assert len(depthwise) == 13


def test_mobilenet_width_and_resolution_multipliers_match_paper() -> None:
    _needs("mobilenet_v1")
    stats = profile(create_model("mobilenet_v1", imagenet=True, alpha=0.5, rho=160 / 224))
    assert stats.input_shape == (3, 160, 160)
    assert round(stats.total_macs / 1e6) == 77  # paper: 0.5 MobileNet-160 has "76 million" mult-adds (76.5M)
    _needs("mobilenet_v2")
    v2 = profile(create_model("mobilenet_v2", imagenet=True))
    assert abs(v2.total_macs / 1e6 - 300) < 1  # Sandler et al.: 300M multiply-adds at 224
