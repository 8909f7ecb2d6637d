"""ONNX QDQ export: onnxruntime's optimized graph runs every conv/linear on integer kernels, and its outputs
match the integer reference interpreter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tests.graph._int8_models import int8, small_models

from lowbit.export import export, list_exporters
from lowbit.export.onnx_qdq import integer_kernel_report
from lowbit.graph import Int8Config, LoweringError
from lowbit.graph.lower import output_qparams
from lowbit.graph.qops import QConv2d, QLinear
from lowbit.runtime.integer import run_integer

ort = pytest.importorskip("onnxruntime")
MODELS = small_models()
# AVX2 machines without VNNI saturate u8 x s8 pair sums in int16: 7-bit weights keep onnxruntime exact;
# "fp32" rounding is onnxruntime's float32 requantization, "single" (one rounding of the exact product) is
# within a step of it.
MATCH = Int8Config(weight_bits=7, rounding="fp32")


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # pinned
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_registered() -> None:
    assert "onnx-qdq" in list_exporters()


@pytest.mark.parametrize("name", list(MODELS))
def test_every_conv_and_linear_runs_on_an_integer_kernel(name: str, tmp_path: Path) -> None:
    model, shape = MODELS[name]
    _, q = int8(model, shape)
    path = export(q, tmp_path / f"{name}.onnx", format="onnx-qdq", example=torch.randn(1, *shape))
    n_layers = sum(isinstance(m, (QConv2d, QLinear)) for m in q.modules())
    for level in ("extended", "all"):
        report = integer_kernel_report(path, level=level)
        assert report["float"] == 0, f"{level}: float compute left: {report['float_nodes']}"
        assert report["integer"] == n_layers, report["ops"]
    assert report["ops"].get("DequantizeLinear") == 1 and report["ops"].get("QuantizeLinear") == 1


@pytest.mark.parametrize("name", list(MODELS))
def test_onnxruntime_matches_the_integer_interpreter_within_one_step(name: str, tmp_path: Path) -> None:
    model, shape = MODELS[name]
    _, q = int8(model, shape, MATCH.model_copy(update={"rounding": "single"}))
    x = torch.randn(32, *shape)
    path = export(q, tmp_path / "m.onnx", format="onnx-qdq", example=x[:1])
    got = _session(path).run(None, {"x": x.numpy()})[0]
    qp = output_qparams(q)[0]
    ort_ints = np.rint(got / np.float32(qp.scale)).astype(np.int64) + qp.zero_point
    ref = run_integer(q, x, dequantize=False).astype(np.int64)
    assert np.abs(ort_ints - ref).max() <= 1
    assert (ort_ints.argmax(1) == ref.argmax(1)).mean() >= 0.95  # ties of equal logits may pick either


@pytest.mark.parametrize("name", list(MODELS))
def test_onnxruntime_equals_the_integer_interpreter_with_float32_rounding(name: str, tmp_path: Path) -> None:
    model, shape = MODELS[name]
    _, q = int8(model, shape, MATCH)
    x = 2.0 * torch.randn(64, *shape)  # wide inputs: large accumulators, many values near a rounding boundary
    path = export(q, tmp_path / "m.onnx", format="onnx-qdq", example=x[:1])
    got = _session(path).run(None, {"x": x.numpy()})[0]
    qp = output_qparams(q)[0]
    ort_ints = np.rint(got / np.float32(qp.scale)).astype(np.int64) + qp.zero_point
    assert np.array_equal(ort_ints, run_integer(q, x, dequantize=False).astype(np.int64))


def test_weights_are_stored_as_int8(tmp_path: Path) -> None:
    import onnx

    model, shape = MODELS["lenet5"]
    _, q = int8(model, shape)
    path = export(q, tmp_path / "m.onnx", format="onnx-qdq", example=torch.randn(1, *shape))
    inits = {i.name: i for i in onnx.load(str(path)).graph.initializer}
    weights = [i for n, i in inits.items() if n.endswith("_weight_q")]
    assert len(weights) == 4 and all(i.data_type == onnx.TensorProto.INT8 for i in weights)
    params = sum(p.numel() for p in model.parameters())
    assert path.stat().st_size < 0.3 * 4 * params  # ~4x smaller than float32


def test_float_model_and_missing_example_are_clear_errors(tmp_path: Path) -> None:
    model, shape = MODELS["lenet5"]
    with pytest.raises(TypeError, match="onnx-qdq exports int8 models"):
        export(model, tmp_path / "m.onnx", format="onnx-qdq", example=torch.randn(1, *shape))
    prepared, _ = int8(model, shape)
    with pytest.raises(ValueError, match="needs example="):
        export(prepared, tmp_path / "m.onnx", format="onnx-qdq")
    assert not (tmp_path / "m.onnx").exists()


def test_prepared_model_is_converted_on_export(tmp_path: Path) -> None:
    model, shape = MODELS["lenet5"]
    prepared, q = int8(model, shape)
    x = torch.randn(4, *shape)
    path = export(prepared, tmp_path / "m.onnx", format="onnx-qdq", example=x[:1])
    got = _session(path).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - q(x).numpy()).max() <= 40 * output_qparams(q)[0].scale


def test_an_op_without_onnx_form_names_the_node(tmp_path: Path) -> None:
    model, shape = MODELS["lenet5"]
    _, q = int8(model, shape)
    flat = next(n for n in q.graph.nodes if n.op == "call_method" and n.target == "flatten")
    with q.graph.inserting_after(flat):
        clone = q.graph.call_method("clone", (flat,))
    flat.replace_all_uses_with(clone, delete_user_cb=lambda user: user is not clone)
    q.recompile()
    with pytest.raises(LoweringError, match="node clone calls clone, which has no integer ONNX form"):
        export(q, tmp_path / "m.onnx", format="onnx-qdq", example=torch.randn(1, *shape))


def test_cli_export_writes_an_integer_onnx_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lowbit.cli import main

    out = tmp_path / "lenet5.onnx"
    assert main(["export", "lenet5", "--format", "onnx-qdq", "--out", str(out), "--calibrate", "2",
                 "--weight-bits", "7", "--speed-batch", "0"]) == 0
    text = capsys.readouterr().out
    assert "calibrating on 2 batches of mnist" in text and "4 conv/linear on integer kernels, 0 float" in text
    assert integer_kernel_report(out)["float"] == 0


def test_cli_export_rejects_an_unknown_format(capsys: pytest.CaptureFixture[str]) -> None:
    from lowbit.cli import main

    with pytest.raises(SystemExit):
        main(["export", "lenet5", "--format", "onnx-int4"])
    assert "invalid choice: 'onnx-int4'" in capsys.readouterr().err


def test_export_warns_exactly_when_onnxruntime_leaves_float_kernels(tmp_path: Path) -> None:
    import warnings

    model, shape = MODELS["lenet5"]
    for activation in ("uint8", "int8"):  # int8 activations: float convs on x86 without VNNI
        _, q = int8(model, shape, Int8Config(activation=activation))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            path = export(q, tmp_path / f"{activation}.onnx", format="onnx-qdq", example=torch.zeros(1, *shape))
        floats = integer_kernel_report(path)["float"]
        warned = [w for w in caught if issubclass(w.category, RuntimeWarning) and "in float" in str(w.message)]
        assert bool(warned) == (floats > 0), (activation, floats)


@pytest.mark.parametrize("int8_slower", [False, True])
def test_export_keeps_the_float_model_exactly_when_int8_is_slower(
        int8_slower: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    from lowbit.export import onnx_qdq

    model, shape = MODELS["lenet5"]
    _, q = int8(model, shape, MATCH)
    timed: list[int] = []

    def fake_median_ms(sessions: dict[str, ort.InferenceSession], x: np.ndarray, rounds: int, runs: int) -> dict:
        timed.append(len(x))
        return {"int8": 2.0 if int8_slower else 1.0, "float": 1.5}

    monkeypatch.setattr(onnx_qdq, "_median_ms", fake_median_ms)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export(q, tmp_path / "m.onnx", format="onnx-qdq", example=torch.zeros(1, *shape), float_model=model,
                      speed_batch=3)
    assert timed == [3]
    kept_float = [w for w in caught if "wrote the float model" in str(w.message)]
    assert bool(kept_float) == int8_slower
    report = integer_kernel_report(path)
    x = torch.randn(4, *shape)
    got = _session(path).run(None, {_session(path).get_inputs()[0].name: x.numpy()})[0]
    if int8_slower:  # the float file: float kernels only, and the float model's outputs
        assert report["integer"] == 0 and report["float"] == 4
        with torch.no_grad():
            np.testing.assert_allclose(got, model.eval()(x).numpy(), rtol=1e-4, atol=1e-4)
    else:
        assert report["integer"] == 4 and report["float"] == 0


def test_speed_check_measures_both_files_and_rejects_a_bad_batch(tmp_path: Path) -> None:
    from lowbit.export.onnx_qdq import keep_float_if_slower

    model, shape = MODELS["lenet5"]
    _, q = int8(model, shape, MATCH)
    path = export(q, tmp_path / "m.onnx", format="onnx-qdq", example=torch.zeros(1, *shape))
    sp = keep_float_if_slower(path, model, torch.zeros(1, *shape), batch=2, rounds=1, runs=2)
    assert sp["int8_ms"] > 0 and sp["float_ms"] > 0 and sp["kept"] in ("int8", "float")
    assert (integer_kernel_report(path)["integer"] == 0) == (sp["kept"] == "float")
    with pytest.raises(ValueError, match="batch and threads must be >= 1"):
        keep_float_if_slower(path, model, torch.zeros(1, *shape), batch=0)
