"""The ``lowbit`` command: help, listings, one-line errors with exit status 2, train/eval/summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lowbit.cli import commands, main
from lowbit.models import list_models

COMMANDS = ["run", "compress", "train", "eval", "summary", "models", "datasets"]


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowbit: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``lowbit train`` of LeNet-300-100 on 8x8 digits (about a second)."""
    out = tmp_path_factory.mktemp("train")
    code = main(["train", "lenet300_100", "--data", "digits", "--epochs", "2", "--lr", "0.05", "--batch-size", "64",
                 "--out", str(out), "--set", "model.kwargs.in_features=64"])
    assert code == 0
    return out / "train" / "model.safetensors"


def test_help_lists_every_command_via_python_m() -> None:
    res = subprocess.run([sys.executable, "-m", "lowbit.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for command in COMMANDS:
        assert f"    {command} " in res.stdout


def test_models_glob(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "resnet*"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines()[1:]]
    assert names[:4] == ["resnet20", "resnet32", "resnet44", "resnet56"] and "lenet5" not in names
    assert "3x32x32" in out and "cifar10" in out


def test_datasets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["datasets"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert {"mnist", "digits", "cifar10"} <= set(names)


def test_unknown_model_is_one_line_listing_valid_names(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["train", "lenet7", "--data", "digits", "--out", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "unknown model 'lenet7'" in line
    assert set(list_models()) <= set(line.split("valid names: ")[1].split(", "))
    assert not (tmp_path / "run").exists()
    assert main(["summary", "lenet7"]) == 2
    assert "valid names" in one_error_line(capsys.readouterr().err)


def test_bad_recipe_exits_2_naming_file_and_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "output": str(tmp_path / "run"), "model": {"name": "lenet5"},
                                    "data": {"name": "mnist"}, "stages": [{"type": "train", "epoch": 1}]}))
    assert main(["run", str(path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{path}: stages[0].epoch: unknown key (did you mean 'epochs'?)" in line
    assert main(["run", str(path), "--set", "stages.0=[1"]) == 2  # a value that is not YAML stays a string
    assert "stages[0]: a stage is a mapping" in one_error_line(capsys.readouterr().err)
    assert main(["run", str(path), "--set", "stages.4.epochs=1"]) == 2
    assert "stages has 1 items; no index 4" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_eval_of_a_corrupt_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert main(["eval", str(bad)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(bad) in line and "corrupt" in line
    assert main(["eval", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such checkpoint file" in one_error_line(capsys.readouterr().err)


def test_eval_uses_the_checkpoint_data_set(capsys: pytest.CaptureFixture[str], digits_checkpoint: Path) -> None:
    assert main(["eval", str(digits_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "digits test acc" in out
    acc = float(out.split("test acc")[1].split("%")[0])
    assert acc > 60


def test_eval_on_a_data_set_the_model_does_not_fit(capsys: pytest.CaptureFixture[str],
                                                   digits_checkpoint: Path) -> None:
    assert main(["eval", str(digits_checkpoint), "--data", "mnist"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "(it was trained on 'digits') does not accept data set 'mnist' (input (1, 28, 28))" in line


@pytest.mark.parametrize("command", ["export", "lower"])
def test_export_and_lower_refuse_inputs_the_model_does_not_take(
    capsys: pytest.CaptureFixture[str], digits_checkpoint: Path, tmp_path: Path, command: str
) -> None:
    fmt = ["--format", "onnx-qdq", "--out", str(tmp_path / "m.onnx")] if command == "export" else []
    # calibration data of another shape than the model's (8x8 digits model, 28x28 MNIST)
    assert main([command, str(digits_checkpoint), *fmt, "--data", "mnist", "--calibrate", "1"]) == 2
    assert "does not accept data set 'mnist' (input (1, 28, 28))" in one_error_line(capsys.readouterr().err)
    # an --input-shape the model cannot take
    assert main([command, "lenet5", *fmt, "--input-shape", "3,32,32", "--random-calibration", "--calibrate", "1"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "lenet5 does not accept input 3x32x32" in line and "pass --input-shape C,H,W" in line
    assert not (tmp_path / "m.onnx").exists()


def test_truncated_checkpoint(capsys: pytest.CaptureFixture[str], digits_checkpoint: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(digits_checkpoint.read_bytes()[:-1000])
    assert main(["eval", str(cut)]) == 2
    assert "truncated or corrupt" in one_error_line(capsys.readouterr().err)


def test_summary(capsys: pytest.CaptureFixture[str], digits_checkpoint: Path) -> None:
    pytest.importorskip("lowbit.hw.counts")
    assert main(["summary", "lenet5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["params"] == 431_080
    assert main(["summary", str(digits_checkpoint), "--input-shape", "1,8,8"]) == 0
    assert "fc1" in capsys.readouterr().out
    assert main(["summary", str(digits_checkpoint)]) == 0  # the checkpoint records its input shape
    assert "fc1" in capsys.readouterr().out


def test_summary_of_a_checkpoint_without_input_shape(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("lowbit.hw.counts")
    from lowbit.models import create_model
    from lowbit.train import save_model

    path = save_model(tmp_path / "m.safetensors", create_model("lenet300_100", in_features=64))
    assert main(["summary", str(path)]) == 2  # the registered 1x28x28 does not fit in_features=64
    assert "pass --input-shape" in one_error_line(capsys.readouterr().err)


def test_unexpected_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(commands, "cmd_datasets", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["datasets"])


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["frobnicate"], ["summary", "lenet5", "--input-shape", "a,b"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    capsys.readouterr()


@pytest.mark.parametrize("text", ["a,b", "3,,2", "3,x,2", "1,28,", "0,28,28", "-1x28x28", ""])
def test_malformed_input_shapes_are_usage_errors(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["summary", "lenet5", "--input-shape", text])
    assert exit_.value.code == 2
    assert "--input-shape: expected" in capsys.readouterr().err


def test_input_shape_takes_commas_or_x(capsys: pytest.CaptureFixture[str]) -> None:
    for text in ("1,28,28", "1x28x28"):
        assert main(["summary", "lenet5", "--input-shape", text, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["input_shape"] == [1, 28, 28]


def test_run_then_summary_uses_the_recorded_input_shape(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("lowbit.hw.counts")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "model": {"name": "lenet300_100", "kwargs": {"in_features": 64}},
                                    "data": {"name": "digits"}, "stages": [{"type": "evaluate"}, {"type": "save"}]}))
    out = tmp_path / "run"
    assert main(["run", str(path), "--set", f"output={out}"]) == 0
    assert json.loads((out / "results.json").read_text())["command"] == f"lowbit run {path} --set output={out}"
    capsys.readouterr()
    assert main(["summary", str(out / "model.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input_shape"] == [1, 8, 8]


def test_compress_then_eval_and_summary_of_the_lbz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "c.yaml"
    recipe.write_text(f"""
version: 1
name: c
output: {tmp_path / "run"}
model: {{name: lenet300_100, kwargs: {{in_features: 64}}}}
data: {{name: digits}}
stages:
  - {{type: train, epochs: 2, batch_size: 32, lr: 0.05, channels_last: false}}
  - {{type: prune, rules: {{"*": 0.7}}}}
  - {{type: cluster, types: {{Linear: 3}}}}
  - {{type: encode}}
""")
    assert main(["compress", str(recipe)]) == 0
    lbz = tmp_path / "run" / "model.lbz"
    capsys.readouterr()
    assert main(["eval", str(lbz)]) == 0
    out = capsys.readouterr().out
    acc = float(out.split("test acc ")[1].split("%")[0])
    assert acc > 50.0 and "digits" in out  # the data set is read from the file's header
    assert main(["summary", str(lbz), "--json"]) == 0
    totals = json.loads(capsys.readouterr().out)["totals"]
    assert totals["params"] == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert 0.69 < totals["sparsity"] < 0.71  # 70% of every weight pruned; biases are not weights


def test_compress_needs_an_encode_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nname: r\nmodel: {name: lenet5}\ndata: {name: mnist}\nstages: [{type: evaluate}]\n")
    assert main(["compress", str(recipe)]) == 2
    assert "ends in an 'encode' stage" in one_error_line(capsys.readouterr().err)


def test_quantizers_lists_and_documents(capsys: pytest.CaptureFixture[str]) -> None:
    from lowbit.quant import quantizers

    assert main(["quantizers", "laq_*"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert listed == quantizers.list("laq_*") == ["laq_linear", "laq_log", "laq_ternary"]
    assert main(["quantizers", "--name", "ttq"]) == 0
    doc = capsys.readouterr().out
    assert "lowbit.quant.ternary.TTQ" in doc and "arXiv:1612.01064" in doc and "Args:" in doc
    assert main(["quantizers", "--name", "tqq"]) == 2
    assert "did you mean ttq?" in capsys.readouterr().err
