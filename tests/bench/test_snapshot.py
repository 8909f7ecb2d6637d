"""bench.snapshot: runs carried to a fresh machine resume to the result they would have had."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from bench.snapshot import restore, save

from lowbit.data import load_dataset
from lowbit.models import create_model
from lowbit.train import TrainConfig, fit, load_checkpoint

CFG = TrainConfig(epochs=2, batch_size=32, lr=0.05, checkpoint_every=10, seed=1, channels_last=False)


class _Crash:
    def after_step(self, model: torch.nn.Module, step: int) -> None:
        if step == 53:  # inside epoch 2 (47 steps per epoch); the last checkpoint is step 50
            raise KeyboardInterrupt


def _fit(run: Path | None, **kw) -> dict:  # noqa: ANN003
    torch.manual_seed(0)
    model = create_model("lenet300_100", in_features=64)
    return fit(model, load_dataset("digits"), CFG, run_dir=run, resume=run is not None, show_progress=False, **kw)


def test_an_unfinished_run_resumes_on_a_fresh_machine_to_the_uninterrupted_result(tmp_path: Path) -> None:
    reference = _fit(None).final
    runs, snap = tmp_path / "runs", tmp_path / "repo" / "runs"
    with pytest.raises(KeyboardInterrupt):
        _fit(runs / "bench" / "row", callbacks=[_Crash()])
    _fit(runs / "bench" / "done")
    copied = save(["bench"], runs, snap)
    assert (snap / "bench" / "row" / "last.safetensors") in copied
    assert (snap / "bench" / "done" / "model.safetensors") in copied
    shutil.rmtree(runs)  # the fresh machine
    restore(snap, runs)
    assert load_checkpoint(runs / "bench" / "row" / "last.safetensors").meta["step"] == 50
    assert _fit(runs / "bench" / "row").final == reference
    done = _fit(runs / "bench" / "done", callbacks=[_Crash()])  # finished: only re-read, no step taken
    assert done.final == reference


def test_restore_keeps_a_run_that_went_further_here(tmp_path: Path) -> None:
    snap, runs = tmp_path / "snap", tmp_path / "runs"
    (snap / "b" / "r").mkdir(parents=True)
    (snap / "b" / "r" / "last.safetensors").write_bytes(b"old")
    (snap / "b" / "r" / "metrics.jsonl").write_text("{}\n")
    (runs / "b" / "r").mkdir(parents=True)
    (runs / "b" / "r" / "last.safetensors").write_bytes(b"further")
    assert restore(snap, runs) == [runs / "b" / "r" / "metrics.jsonl"]
    assert (runs / "b" / "r" / "last.safetensors").read_bytes() == b"further"


def test_save_replaces_the_old_snapshot_and_leaves_out_large_files(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    runs, snap = tmp_path / "runs", tmp_path / "snap"
    (runs / "b" / "r").mkdir(parents=True)
    (runs / "b" / "r" / "model.safetensors").write_bytes(b"x" * 100)
    (runs / "b" / "r" / "big.safetensors").write_bytes(b"x" * 3000)
    (snap / "b" / "r").mkdir(parents=True)
    (snap / "b" / "gone").mkdir(parents=True)
    (snap / "b" / "gone" / "last.safetensors").write_bytes(b"stale")
    assert save(["b"], runs, snap, max_mb=2000 / 2**20) == [snap / "b" / "r" / "model.safetensors"]
    assert not (snap / "b" / "gone").exists()  # the snapshot mirrors the runs as they are
    out = capsys.readouterr().out
    assert "left out" in out and "big.safetensors" in out
    with pytest.raises(ValueError, match=r"no runs under .*holds \['b'\]"):
        save(["distil"], runs, snap)
