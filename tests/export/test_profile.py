"""onnxruntime profiles per node: every node of the optimized graph is attributed, integer kernels are told from
float ones, and files it cannot profile are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from tests.graph._int8_models import int8, small_models

from lowbit.cli import main
from lowbit.export import export
from lowbit.export.onnx_qdq import _float_onnx, integer_kernel_report
from lowbit.export.profile import format_profile, profile_onnx

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("profile")
    model, shape = small_models()["resnet8"]
    _, q = int8(model, shape)
    example = torch.randn(1, *shape)
    _float_onnx(model, example, tmp / "float.onnx")
    return {"float": tmp / "float.onnx", "int8": export(q, tmp / "int8.onnx", format="onnx-qdq", example=example)}


def test_int8_time_is_attributed_to_the_integer_kernels_onnxruntime_chose(files: dict[str, Path]) -> None:
    prof = profile_onnx(files["int8"], batch=4, runs=3, warmup=1, level="extended")
    report = integer_kernel_report(files["int8"], level="extended")
    assert sum(o["count"] for o in prof["by_op"].values()) == sum(report["ops"].values())  # every node, once
    integer = {op: o["count"] for op, o in prof["by_op"].items() if o["kind"] == "integer"}
    assert sum(integer.values()) == report["integer"] > 0
    assert not any(o["kind"] == "float" for o in prof["by_op"].values())
    ms = [r["ms"] for r in prof["nodes"]]
    assert ms == sorted(ms, reverse=True) and min(ms) >= 0
    assert sum(ms) == pytest.approx(prof["kernel_ms"], rel=1e-3, abs=1e-3)
    assert sum(o["share_pct"] for o in prof["by_op"].values()) == pytest.approx(100, abs=0.1)
    assert prof["wall_ms"] > 0
    text = format_profile(prof, top=2)
    assert prof["nodes"][0]["name"][:40] in text and "QLinearConv" in text


def test_a_float_file_shows_float_kernels_only(files: dict[str, Path]) -> None:
    prof = profile_onnx(files["float"], batch=2, runs=2, warmup=0)
    kinds = {o["kind"] for o in prof["by_op"].values()}
    assert "float" in kinds and "integer" not in kinds


def test_bad_files_and_arguments_are_clear_errors(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such ONNX file"):
        profile_onnx(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07not a model" * 10)
    with pytest.raises(ValueError, match="onnxruntime cannot load it"):
        profile_onnx(tmp_path / "junk.onnx")
    with pytest.raises(ValueError, match="batch must be >= 1, got 0"):
        profile_onnx(files["int8"], batch=0)
    with pytest.raises(ValueError, match="level must be one of"):
        profile_onnx(files["int8"], level="max")
    fixed = tmp_path / "fixed.onnx"  # a batch of 1 written into the file
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 2], [0.5] * 6)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "fixed",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(fixed))
    with pytest.raises(ValueError, match="fixed batch of 1"):
        profile_onnx(fixed, batch=8)
    assert profile_onnx(fixed, batch=1, runs=1)["nodes"]


def test_cli_profiles_several_files(files: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", str(files["float"]), str(files["int8"]), "--batch", "2", "--runs", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["file"] for p in out] == [str(files["float"]), str(files["int8"])]
    assert main(["profile", str(tmp_path / "missing.onnx")]) == 2
    assert "no such ONNX file" in capsys.readouterr().err
