"""The model zoo: every registered model trains (forward + backward), and sizes match the papers.

Parameter counts include batch-norm weights and biases (torchvision's convention, which the
ImageNet reference numbers below come from); MACs count conv and linear multiply-accumulates.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch
from torch import nn

from lowbit.models import create_model, list_models, model_entry
from lowbit.models.resnet import CifarResNet

NUM_CLASSES = 7  # not 10 or 1000, so that a constructor ignoring num_classes is caught



def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_zoo_has_every_family() -> None:
    expected = {
        "lenet300_100", "lenet5", "resnet20", "mlp_bnn", "vgg_small", "mobilenet_v1", "mobilenet_v2",
        "squeezenet", "squeezenext", "efficientnet_b0", "char_lstm", "char_gru",
    }
    assert expected <= set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    entry = model_entry(name)
    model = create_model(name, num_classes=NUM_CLASSES)
    if entry.is_text:
        x = torch.randint(0, NUM_CLASSES, (2, *entry.input_shape))  # (B, T) token ids
        target = torch.randint(0, NUM_CLASSES, (2, *entry.input_shape))
        want: tuple[int, ...] = (2, *entry.input_shape, NUM_CLASSES)
    else:
        x = torch.randn(2, *entry.input_shape)
        target = torch.randint(0, NUM_CLASSES, (2,))
        want = (2, NUM_CLASSES)
    out = model(x)
    assert out.shape == want
    assert torch.isfinite(out).all()
    loss = nn.functional.cross_entropy(out.flatten(0, -2), target.flatten())
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reached {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {pname}"


@pytest.mark.parametrize("name", [n for n in list_models() if not model_entry(n).is_text])
def test_image_models_take_in_chans(name: str) -> None:
    entry = model_entry(name)
    if "in_chans" not in inspect.signature(entry.fn).parameters:
        pytest.skip(f"{name} takes no in_chans")  # lenet300_100: a fixed 784-input MLP
    model = create_model(name, in_chans=1).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, *entry.input_shape[1:]))
    assert out.shape == (1, 10)


# ------------------------------------------------------------------ parameter counts vs the papers

PARAMS = [
    # (name, kwargs, parameters, where the number comes from)
    ("lenet300_100", {}, 266_610, "Deep Compression Table 2"),
    ("lenet5", {}, 431_080, "Deep Compression Table 3 (Caffe LeNet-5)"),
    ("resnet20", {}, 269_722, "He et al.: 0.27M, option A"),
    ("resnet8", {}, 75_290, "counted by hand: convs 432 + 4,608 + 13,824 + 55,296, BN 32 + 64 + 128 + 256, fc 650"),
    ("mobilenet_v1", {"imagenet": True}, 4_231_976, "Howard et al. Table 8: 4.2M"),
    ("mobilenet_v2", {"imagenet": True}, 3_504_872, "torchvision; Sandler et al. Table 4: 3.4M"),
    ("efficientnet_b0", {"imagenet": True}, 5_288_548, "torchvision; Tan & Le Table 2: 5.3M"),
    ("squeezenet", {"imagenet": True}, 1_248_424, "Iandola et al. Table 1: 1,248,424 (4.8MB)"),
    ("vgg_small", {}, 4_660_106, "LQ-Nets VGG-Small: six convs + one 8192 -> 10 Linear"),
    ("vgg_small", {"fc_hidden": (1024, 1024)}, 14_029_706, "BNN CIFAR-10 net (2x1024 FC)"),
    ("mlp_bnn", {}, 36_831_242, "BNN MNIST MLP, 3 x 4096"),
]


@pytest.mark.parametrize(("name", "kwargs", "expected", "source"), PARAMS, ids=[f"{p[0]}{p[1] or ''}" for p in PARAMS])
def test_parameter_count(name: str, kwargs: dict, expected: int, source: str) -> None:
    assert _params(create_model(name, **kwargs)) == expected, source


def test_squeezenext_parameter_count_vs_paper() -> None:
    # The paper's table gives 0.72M for 1.0-SqNxt-23. This implementation (convs without bias, since a
    # batch norm follows each) has 718,280; the authors' Caffe model also has conv biases (+5,776).
    n = _params(create_model("squeezenext", imagenet=True))
    assert n == 718_280
    assert abs(n - 720_000) / 720_000 < 0.01


# ------------------------------------------------------------------ architecture: strides and scaling


def _final_map(model: nn.Module, shape: tuple[int, ...]) -> tuple[tuple[int, int], tuple[int, ...]]:
    """(spatial size entering the last global average pool, output shape) for a batch of one."""
    pool = [m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d)][-1]
    seen: list[tuple[int, int]] = []
    handle = pool.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape[-2:])))
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, *shape))
    handle.remove()
    return seen[-1], tuple(out.shape)


@pytest.mark.parametrize(
    ("name", "cifar_side", "imagenet_side"),
    [("mobilenet_v1", 4, 7), ("mobilenet_v2", 4, 7), ("efficientnet_b0", 4, 7), ("squeezenext", 4, 7),
     ("squeezenet", 4, 13)],
)
def test_cifar_and_imagenet_strides(name: str, cifar_side: int, imagenet_side: int) -> None:
    cifar = create_model(name)
    assert cifar.input_shape == (3, 32, 32)
    assert _final_map(cifar, (3, 32, 32)) == ((cifar_side, cifar_side), (1, 10))
    imagenet = create_model(name, imagenet=True)  # num_classes defaults to 1000 there
    assert imagenet.input_shape == (3, 224, 224)
    assert _final_map(imagenet, (3, 224, 224)) == ((imagenet_side, imagenet_side), (1, 1000))


def test_mobilenet_v1_multipliers() -> None:
    half = create_model("mobilenet_v1", imagenet=True, alpha=0.5)
    assert half.fc.in_features == 512
    assert create_model("mobilenet_v1", imagenet=True, rho=5 / 7).input_shape == (3, 160, 160)
    assert create_model("mobilenet_v1", rho=0.5).input_shape == (3, 16, 16)


def test_efficientnet_compound_scaling() -> None:
    b0, b1 = create_model("efficientnet_b0", imagenet=True), create_model("efficientnet_b0", imagenet=True, phi=1)
    assert b1.input_shape == (3, 258, 258)  # round(224 * 1.15)
    assert b1.fc.in_features == 1408  # 1280 * 1.1, a multiple of 8
    assert len(b1.features) > len(b0.features)  # ceil(repeats * 1.2)
    assert _params(b1) > _params(b0)


def test_efficientnet_fused_replaces_early_stages_only() -> None:
    from lowbit.models.efficientnet import FusedMBConv, MBConv

    model = create_model("efficientnet_b0", fused=True)
    blocks = [m for m in model.features if isinstance(m, (MBConv, FusedMBConv))]
    kinds = [type(b).__name__ for b in blocks]
    assert kinds == ["FusedMBConv"] * 5 + ["MBConv"] * 11  # stages 1-3 (1 + 2 + 2 blocks) fused
    assert not any(isinstance(m, nn.Conv2d) and m.groups > 1 for b in blocks[:5] for m in b.modules())


def test_vgg_small_width_mult() -> None:
    model = create_model("vgg_small", width_mult=0.5)
    assert model.classifier[-1].in_features == 256 * 4 * 4


# ------------------------------------------------------------------ MACs (needs lowbit.hw.counts)

MACS = [
    # (name, paper MACs at 224x224, relative tolerance)
    ("mobilenet_v1", 569e6, 0.01),  # Howard et al. Table 8
    ("mobilenet_v2", 300e6, 0.03),  # Sandler et al. Table 4
    ("efficientnet_b0", 390e6, 0.03),  # Tan & Le Table 2 (0.39B FLOPS = multiply-adds)
]


@pytest.mark.parametrize(("name", "paper_macs", "tol"), MACS)
def test_imagenet_macs_match_paper(name: str, paper_macs: float, tol: float) -> None:
    counts = pytest.importorskip("lowbit.hw.counts")
    model = create_model(name, imagenet=True).eval()
    with torch.no_grad():
        stats = counts.profile(model, (3, 224, 224))
    assert abs(stats.total_macs - paper_macs) / paper_macs < tol, f"{name}: {stats.total_macs / 1e6:.1f}M MACs"


# ------------------------------------------------------------------ bad arguments

BAD: list[tuple[Callable[[], nn.Module], str]] = [
    (lambda: CifarResNet(21), "6n\\+2"),
    (lambda: create_model("resnet20", shortcut="C"), "shortcut"),
    (lambda: create_model("mobilenet_v1", alpha=0.0), "alpha"),
    (lambda: create_model("mobilenet_v1", alpha=-1.0), "alpha"),
    (lambda: create_model("mobilenet_v1", rho=0.0), "rho"),
    (lambda: create_model("mobilenet_v2", width_mult=-0.5), "width_mult"),
    (lambda: create_model("vgg_small", width_mult=-1.0), "width_mult"),
    (lambda: create_model("vgg_small", fc_hidden=(1024, 0)), "fc_hidden"),
    (lambda: create_model("squeezenext", width_mult=0.0), "width_mult"),
    (lambda: create_model("efficientnet_b0", phi=float("nan")), "phi"),
    (lambda: create_model("mlp_bnn", act="sign"), "act"),
    (lambda: create_model("mlp_bnn", width=0), "width"),
    (lambda: create_model("char_lstm", hidden=0), "hidden"),
    (lambda: create_model("char_gru", dropout=1.5), "dropout"),
]


@pytest.mark.parametrize(("build", "match"), BAD, ids=[m for _, m in BAD])
def test_bad_arguments_raise_value_error(build: Callable[[], nn.Module], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()
