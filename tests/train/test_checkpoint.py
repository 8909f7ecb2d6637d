from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lowbit.models import create_model
from lowbit.train import CheckpointError, load_checkpoint, load_model, save_model


def _saved(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model = create_model("lenet5")
    return model, save_model(tmp_path / "m.safetensors", model, dataset="mnist", results={"test_acc": 1.0})


def test_round_trip_rebuilds_the_same_model(tmp_path: Path) -> None:
    model, path = _saved(tmp_path)
    loaded, ckpt = load_model(path)
    assert ckpt.meta["dataset"] == "mnist" and ckpt.meta["results"] == {"test_acc": 1.0}
    x = torch.randn(3, 1, 28, 28)
    model.eval(), loaded.eval()
    assert torch.equal(model(x), loaded(x))
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed away


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_flipped_byte_in_the_weights_fails_the_checksum(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF  # inside the last tensor's data, after the header
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)


def test_a_pickle_is_never_loaded(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(create_model("lenet5").state_dict(), path)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(path)


def test_foreign_safetensors_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a lowbit checkpoint"):
        load_checkpoint(path)


def test_wrong_architecture_names_the_mismatched_tensors(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_model(path, num_classes=7)
    assert "fc2.weight: (10, 500) in" in str(e.value) and "(7, 500) in model" in str(e.value)
    from lowbit.train.checkpoint import load_state_into

    with pytest.raises(CheckpointError, match="missing in .*conv1.weight"):
        load_state_into(create_model("lenet5"), {"fc9.weight": torch.zeros(1)})


def test_a_quantized_model_reloads_quantized_not_as_float(tmp_path: Path) -> None:
    from lowbit.quant import QuantConfig, quantize_

    model = create_model("lenet5")
    # ste_sign has no state: before transforms were recorded, this reloaded silently as a float model
    quantize_(model, QuantConfig(rules={"conv2": {"weight": "ste_sign"}, "fc1": {"weight": "twn"}}))
    path = save_model(tmp_path / "q.safetensors", model)
    loaded, _ = load_model(path)
    assert type(loaded.conv2).__name__ == "QuantConv2d" and type(loaded.conv1).__name__ == "Conv2d"
    model.eval(), loaded.eval()
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    w = loaded.conv2.weight_quantizer(loaded.conv2.weight)
    assert set(w.unique().tolist()) <= {-1.0, 1.0}


def test_a_pruned_model_reloads_with_its_masks(tmp_path: Path) -> None:
    from lowbit.prune import PruneConfig, masks_of, prune_

    model = create_model("lenet300_100")
    prune_(model, PruneConfig(rules={"*": 0.9}))
    loaded, _ = load_model(save_model(tmp_path / "p.safetensors", model))
    assert set(masks_of(loaded)) == set(masks_of(model))
    assert torch.equal(loaded.fc1.weight, model.fc1.weight)


def test_an_unknown_transform_in_a_file_is_refused(tmp_path: Path) -> None:
    from lowbit.train.checkpoint import save_checkpoint

    model = create_model("lenet5")
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    path = save_checkpoint(tmp_path / "x.safetensors", tensors,
                           {"model": {"name": "lenet5", "kwargs": {}, "transforms": [{"os.system": "rm -rf /"}]}})
    with pytest.raises(CheckpointError, match="unknown model transform"):
        load_model(path)
