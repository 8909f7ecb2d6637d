"""The quantizer contract, checked for every registered quantizer (a new method is tested automatically).

Every quantizer of ``lowbit.quant.quantizers`` is built with its default arguments (the ``weight: name``
form of a config) and must:

- return a tensor of the input's shape and float dtype, finite for finite inputs (all zeros, constants,
  a single non-zero, a large range, in training and eval mode);
- not hide a NaN: a NaN input either raises ``ValueError`` or gives a NaN in the output (a sign or
  threshold that maps NaN to a level would train on garbage silently). An infinite input may be mapped
  to a level (``sign(+inf) = +1`` is right) or raise ``ValueError``; no other exception;
- expose ``bit_width``, an int >= 1; where ``levels()`` is not None (read after a forward, since levels
  may follow a learned or data-dependent scale) hold at most ``2**bit_width`` values and output only those;
- output at most ``2**bit_width`` distinct values for any 1-row input (hypothesis; one row is one
  channel for per-channel quantizers), compared exactly: write a straight-through estimator as
  ``q + (x - x.detach())`` (exactly ``q`` forward), not ``x + (q - x).detach()``, whose rounding can leave an
  output one ulp off its level;
- give finite gradients of the input's shape (a straight-through estimator, not a zero-or-None gradient);
- survive ``copy.deepcopy`` and load its ``state_dict`` into a freshly built instance (checkpoints and
  ``--resume`` build the quantized model first, then load), giving the same output in eval mode;
- carry the house docstring: a ``References`` section naming the paper.

Names starting with ``test_`` are test-only quantizers registered by other tests and are skipped. Two tiny
unregistered reference quantizers run through the same checks, so the suite tests itself even before any
method is registered.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowbit.quant  # noqa: F401  (imports every method, which registers it)
from _quantizers import Uniform  # round(clamp(x, 0, 1) * n) / n, DoReFa-style activations
from lowbit.quant import Quantizer, get_quantizer, quantizers


class _RefSign(Quantizer):
    """Reference: ``alpha * sign(x)``, ``alpha = mean |x|`` (XNOR-Net), identity STE.

    References:
        Rastegari et al., "XNOR-Net", arXiv:1603.05279.
    """

    bit_width = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = x.abs().mean()
        q = alpha * torch.where(x == 0, torch.ones_like(x), torch.sign(x))
        self.scale = alpha.detach()
        return q + (x - x.detach())  # exactly q forward (x + (q - x).detach() can be an ulp off q)

    def levels(self) -> torch.Tensor | None:
        return None if self.scale is None else torch.stack([-self.scale, self.scale])


REGISTERED = [name for name in quantizers.list() if not name.startswith("test_")]
CASES = [pytest.param(name, id=name) for name in REGISTERED] + [
    pytest.param(_RefSign, id="reference-sign"), pytest.param(Uniform, id="reference-uniform")]
SHAPES = [(16, 9), (4, 3, 5, 5)]  # a Linear weight / activations, a Conv2d weight / activations


def _make(case: str | Callable[[], Quantizer]) -> Quantizer:
    try:
        q = get_quantizer(case) if isinstance(case, str) else case()
    except Exception as e:  # noqa: BLE001  (the message is the point)
        pytest.fail(f"quantizer {case!r} must build with its default arguments: {type(e).__name__}: {e}")
    assert isinstance(q, Quantizer)
    return q


def _inputs(shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    randn = torch.randn(shape, generator=g)
    one_hot = torch.zeros(shape)
    one_hot.view(-1)[3] = 0.7
    large = randn * 1e4
    large.view(-1)[::5] = 1e-12 * randn.view(-1)[::5]
    return {"zeros": torch.zeros(shape), "constant": torch.full(shape, 0.5), "negative": torch.full(shape, -3.0),
            "one-hot": one_hot, "large-range": large, "randn": randn}


def _bit_width(q: Quantizer) -> int:
    bw = q.bit_width
    assert isinstance(bw, int) and not isinstance(bw, bool) and bw >= 1, \
        f"{type(q).__name__}.bit_width must be an int >= 1, got {bw!r}"
    return bw


def test_registry_has_quantizers() -> None:
    if not REGISTERED:
        pytest.skip("no quantizer is registered yet; only the reference quantizers are checked")
    assert all(name == name.lower() for name in REGISTERED)  # snake_case names


@pytest.mark.parametrize("case", CASES)
def test_builds_with_defaults_and_has_an_int_bit_width_and_references(case: str | Callable[[], Quantizer]) -> None:
    q = _make(case)
    _bit_width(q)
    doc = type(q).__doc__ or ""
    assert "References" in doc and "arXiv" in doc, f"{type(q).__name__}'s docstring needs a References section"


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", CASES)
def test_same_shape_float_dtype_and_finite(case: str | Callable[[], Quantizer], shape: tuple[int, ...],
                                           mode: str) -> None:
    for kind, x in _inputs(shape).items():
        q = _make(case).train(mode == "train")
        out = q(x)
        assert isinstance(out, torch.Tensor) and out.shape == x.shape, f"{kind}: shape {tuple(out.shape)}"
        assert out.dtype == x.dtype, f"{kind}: dtype {out.dtype}, input {x.dtype}"
        assert torch.isfinite(out).all(), f"{kind} input: {int((~torch.isfinite(out)).sum())} non-finite outputs"


@pytest.mark.parametrize("case", CASES)
def test_nan_is_never_turned_into_a_finite_value(case: str | Callable[[], Quantizer]) -> None:
    x = torch.randn(8, 6)
    x[2, 3] = float("nan")
    try:
        out = _make(case)(x)
    except ValueError:
        return  # a clear refusal is fine
    assert torch.isnan(out).any(), "a NaN input came out all finite: the quantizer hides a diverged tensor"


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
@pytest.mark.parametrize("case", CASES)
def test_infinite_input_raises_value_error_or_keeps_the_shape(case: str | Callable[[], Quantizer],
                                                              value: float) -> None:
    x = torch.randn(8, 6)
    x[1, 1] = value
    try:
        out = _make(case)(x)
    except ValueError:
        return
    assert out.shape == x.shape


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", CASES)
def test_outputs_lie_on_the_levels(case: str | Callable[[], Quantizer], shape: tuple[int, ...]) -> None:
    for kind, x in _inputs(shape).items():
        q = _make(case)
        out = q(x).detach()
        levels = q.levels()  # after the forward: levels may follow the data or a learned scale
        if levels is None:
            return
        levels = levels.detach().to(out.dtype).flatten()
        assert levels.numel() <= 2 ** _bit_width(q), f"{levels.numel()} levels for {q.bit_width} bits"
        dist = (out.reshape(-1, 1) - levels.reshape(1, -1)).abs().min(dim=1).values
        tol = 1e-6 + 1e-5 * levels.abs().max()
        assert (dist <= tol).all(), f"{kind}: {int((dist > tol).sum())} outputs off the levels {levels.tolist()}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", CASES)
def test_backward_gives_finite_gradients_of_the_input_shape(case: str | Callable[[], Quantizer],
                                                            shape: tuple[int, ...]) -> None:
    q = _make(case)
    x = (0.5 * torch.randn(shape)).requires_grad_()
    out = q(x)
    (out * torch.randn(shape)).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape, "no gradient reached the input (no STE?)"
    assert torch.isfinite(x.grad).all()
    for name, p in q.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), f"non-finite gradient of {name}"


@pytest.mark.parametrize("case", CASES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32),
                       min_size=1, max_size=64),
       scale=st.sampled_from([1e-3, 1.0, 10.0]))
def test_at_most_two_to_the_bits_distinct_values(case: str | Callable[[], Quantizer], values: list[float],
                                                 scale: float) -> None:
    q = _make(case)
    x = torch.tensor(values).reshape(1, -1) * scale  # one row: one channel for a per-channel quantizer
    out = q(x).detach()
    assert torch.isfinite(out).all()
    distinct = torch.unique(out).numel()
    assert distinct <= 2 ** _bit_width(q), f"{distinct} distinct outputs for {q.bit_width} bits"


@pytest.mark.parametrize("case", CASES)
def test_state_dict_loads_into_a_fresh_instance_and_deepcopy_works(case: str | Callable[[], Quantizer]) -> None:
    x = torch.randn(6, 4, 3, 3)
    used = _make(case)
    for _ in range(2):
        used(x)  # training-mode forwards: lazily initialized and running state is set now
    used.eval()
    with torch.no_grad():
        expected = used(x)
    fresh = _make(case)
    try:
        fresh.load_state_dict(used.state_dict())
    except RuntimeError as e:
        pytest.fail(f"the state dict of a used {type(used).__name__} does not load into a fresh one "
                    f"(a checkpoint could not be resumed): {str(e).splitlines()[0]}")
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(x), expected, atol=1e-6), "same state, different output"
        assert torch.allclose(copy.deepcopy(used)(x), expected, atol=1e-6)
