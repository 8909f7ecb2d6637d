"""The training engine: ``fit`` and ``evaluate``, resumable from atomic checkpoints.

A run directory holds ``last.safetensors`` (full training state, rewritten every
``checkpoint_every`` steps and at each epoch end), ``model.safetensors`` (final weights + results),
``metrics.jsonl`` (one line per evaluated epoch) and ``train.json`` (the resolved config).
With ``swa_epochs`` set, the running weight average is part of the training state, and the final model is that
average with re-estimated batch-norm statistics (``metrics.jsonl`` keeps the per-epoch iterates).
``fit(..., resume=True)`` continues from ``last.safetensors`` to the same result as an
uninterrupted run: batches, augmentation and schedule are functions of (seed, epoch, step), and the
optimizer and torch RNG states are restored.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

from lowbit.data import Dataset, Loader
from lowbit.train.checkpoint import CheckpointError, load_checkpoint, load_state_into, save_checkpoint
from lowbit.train.config import TrainConfig
from lowbit.train.progress import progress
from lowbit.train.schedule import lr_at

__all__ = ["Callback", "FitResult", "fit", "evaluate", "build_optimizer", "model_meta", "save_model"]


class Callback(Protocol):
    """Hooks for methods that act during training (pruning masks, regularizers, quantizer updates).

    Every method is optional: the engine calls only those a callback defines. ``task_loss``, defined by at
    most one callback (e.g. knowledge distillation), replaces the cross-entropy of the batch: it gets the
    inputs, targets and the model's logits and returns the loss to train on (``label_smoothing`` must be 0).
    """

    def on_fit_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None: ...
    def task_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor: ...
    def extra_loss(self, model: nn.Module) -> torch.Tensor | None: ...
    def after_step(self, model: nn.Module, step: int) -> None: ...
    def after_epoch(self, model: nn.Module, epoch: int) -> None: ...
    def on_fit_end(self, model: nn.Module) -> None: ...


@dataclass
class FitResult:
    history: list[dict[str, float]]
    final: dict[str, float]
    run_dir: Path | None


def model_meta(model: nn.Module) -> dict[str, Any]:
    """The architecture record a checkpoint needs to rebuild ``model`` from the registry: its name,
    its constructor arguments, and the transforms (e.g. ``quantize_``) applied to it since, in order."""
    meta = {"name": getattr(model, "lowbit_name", type(model).__name__),
            "kwargs": getattr(model, "lowbit_kwargs", {})}
    transforms = getattr(model, "lowbit_transforms", None)
    if transforms:
        meta["transforms"] = list(transforms)
    return meta


def save_model(path: str | os.PathLike[str], model: nn.Module, **meta: Any) -> Path:
    """Write the weights of ``model`` plus JSON ``meta`` (results, data set, ...) atomically.

    A prepared int8 model (``prepare_qat`` / ``prepare_ptq``, calibrated or trained) saves and loads like any
    other; a lowered one (after ``convert``) is refused: its scales live in module attributes, not tensors.
    """
    if getattr(model, "lowbit_int8", {}).get("lowered"):
        raise ValueError("a lowered int8 model (after lowbit.graph.convert) keeps its scales and zero points in "
                         "module attributes, which a weights file cannot hold: save the prepared model (before "
                         "convert) and convert it after loading, or export it (format 'onnx-qdq')")
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    return save_checkpoint(path, tensors, {"kind": "model", "model": model_meta(model), **meta})


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer of ``cfg`` over the trainable parameters of ``model``; the quantizers' own parameters (of
    :class:`lowbit.quant.base.Quantizer` modules) get ``cfg.quantizer_weight_decay`` instead of ``weight_decay``
    (a second parameter group, only when the two differ and the model has such parameters)."""
    from lowbit.quant.base import Quantizer

    quant_ids = {id(p) for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    quant = [p for p in trainable if id(p) in quant_ids]
    params: list[Any] = trainable
    if quant and cfg.quantizer_weight_decay != cfg.weight_decay:
        params = [{"params": [p for p in trainable if id(p) not in quant_ids]},
                  {"params": quant, "weight_decay": cfg.quantizer_weight_decay}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _same_config(saved: Any, cfg: TrainConfig) -> bool:
    """Whether a checkpoint's saved config is ``cfg``; a field added to TrainConfig since (absent from the saved
    dict) counts as its default, so that adding a field does not orphan the runs written before."""
    try:
        return TrainConfig.model_validate(saved) == cfg
    except ValueError:  # pydantic's ValidationError: not a TrainConfig of this version
        return False


def _loss(logits: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    if logits.dim() == 3:  # language model: (B, T, V) against (B, T)
        logits, y = logits.flatten(0, 1), y.flatten()
    return F.cross_entropy(logits, y, label_smoothing=smoothing)


def _prepare(x: torch.Tensor, device: str, channels_last: bool) -> torch.Tensor:
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader, device: str = "cpu", channels_last: bool = False,
             show_progress: bool = False) -> dict[str, float]:
    """Mean loss and accuracy (and bits per character for language models) over ``loader``."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    with progress(len(loader), "eval", "batch") if show_progress else _nullbar() as advance:
        for x, y in loader:
            logits = model(_prepare(x, device, channels_last))
            y = y.to(device)
            if logits.dim() == 3:
                logits, y = logits.flatten(0, 1), y.flatten()
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            count += y.numel()
            advance(1)
    model.train(was_training)
    out = {"loss": total_loss / count, "acc": 100.0 * correct / count}
    if isinstance(loader, _text_loader_type()):
        out["bpc"] = out["loss"] / math.log(2)
    return out


def _text_loader_type() -> type:
    from lowbit.data import TextLoader

    return TextLoader


class _nullbar:
    def __enter__(self):  # type: ignore[no-untyped-def]
        return lambda *a, **k: None

    def __exit__(self, *exc: object) -> None:
        return None


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON (the rest)."""
    sd = opt.state_dict()
    tensors, plain = {}, {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                plain[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "plain": plain}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], js: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    for name, v in js["plain"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    try:
        opt.load_state_dict({"state": state, "param_groups": js["param_groups"]})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"optimizer state does not fit this model/optimizer: {e}") from e


def fit(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    run_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    callbacks: Sequence[object] = (),
    show_progress: bool = True,
) -> FitResult:
    """Train ``model`` on ``data`` per ``cfg``; evaluates on the test split every ``eval_every`` epochs.

    With ``run_dir`` set, checkpoints and metrics are written there, and ``resume=True`` continues
    from ``run_dir/last.safetensors`` if it exists.
    """
    if resume and run_dir is None:
        raise ValueError("resume=True needs a run_dir to resume from")
    torch.manual_seed(cfg.seed)
    device = cfg.device
    channels_last = cfg.channels_last and not data.is_text
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg)
    if cfg.swa_epochs and callbacks:
        raise ValueError("swa_epochs averages plain training: callbacks (pruning masks, quantizers, distillation) "
                         "would be bypassed by the average and its batch-norm pass; train without them")
    avg = AveragedModel(model) if cfg.swa_epochs else None  # its state is checkpointed as 'swa.*'
    train = data.loader("train", cfg.batch_size, shuffle=True, augment=cfg.augment, seed=cfg.seed, seq_len=cfg.seq_len)
    test = data.loader("test", max(cfg.batch_size, 256), seq_len=cfg.seq_len)
    steps_per_epoch = len(train)
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    out = Path(run_dir) if run_dir is not None else None
    last = out / "last.safetensors" if out else None

    step, history = 0, []
    sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}  # running sums of the current epoch
    if resume and last is not None and last.exists():
        ckpt = load_checkpoint(last)
        if not _same_config(ckpt.meta.get("train"), cfg):
            raise CheckpointError(f"{last}: was written with a different training config; "
                                  "resume needs the same one (or start a new run directory)")
        load_state_into(model, ckpt.group("model"), where=str(last))
        try:
            _restore_optimizer(opt, ckpt.group("optim"), ckpt.meta["optimizer"])
        except CheckpointError as e:  # same config, other parameter groups: the model or its quantizers changed
            raise CheckpointError(f"{last}: {e}; the model's parameters are grouped differently from the run that "
                                  "wrote it (another model, quantizer or lowbit version): start a new run "
                                  "directory") from e
        torch.set_rng_state(ckpt.tensors["rng.torch"])
        if avg is not None:
            load_state_into(avg, ckpt.group("swa"), where=str(last))
        step, history, sums = ckpt.meta["step"], ckpt.meta["history"], ckpt.meta["sums"]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))

    def checkpoint() -> None:
        if last is None:
            return
        opt_t, opt_js = _optimizer_tensors(opt)
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update({f"optim.{k[6:]}": v for k, v in opt_t.items()})
        tensors["rng.torch"] = torch.get_rng_state()
        if avg is not None:
            tensors.update({f"swa.{k}": v for k, v in avg.state_dict().items()})
        save_checkpoint(last, tensors, {
            "kind": "training", "model": model_meta(model), "dataset": data.name,
            "train": cfg.model_dump(mode="json"), "step": step, "history": history, "sums": sums,
            "optimizer": opt_js,
        })

    hooks = lambda name: [getattr(c, name) for c in callbacks if hasattr(c, name)]  # noqa: E731
    task_loss = hooks("task_loss")
    if len(task_loss) > 1:
        raise ValueError(f"{len(task_loss)} callbacks define task_loss; at most one may replace the training loss")
    if task_loss and cfg.label_smoothing:
        raise ValueError("label_smoothing applies to the cross-entropy, which a callback's task_loss replaces: "
                         "set it to 0")
    for start in hooks("on_fit_start"):  # e.g. optimizer wrappers (loss-aware quantization reads Adam's state)
        start(model, opt)
    model.train()
    start_epoch = step // steps_per_epoch
    for epoch in range(start_epoch, n_epochs):
        if step >= total_steps:  # resumed a finished run
            break
        first = step - epoch * steps_per_epoch
        end = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
        bar = progress(end, f"epoch {epoch + 1}/{n_epochs}", "batch") if show_progress else _nullbar()
        t0 = time.perf_counter()
        with bar as advance:
            advance(first)
            for x, y in train.batches(epoch, start=first):
                if step >= total_steps or step - epoch * steps_per_epoch >= end:
                    break
                lr = lr_at(cfg.schedule, cfg.lr, step, total_steps, steps_per_epoch,
                           cfg.warmup_epochs, cfg.milestones, cfg.gamma)
                for g in opt.param_groups:
                    g["lr"] = lr
                x, y = _prepare(x, device, channels_last), y.to(device)
                logits = model(x)
                loss = task_loss[0](model, x, y, logits) if task_loss else _loss(logits, y, cfg.label_smoothing)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at step {step} (epoch {epoch + 1}); "
                                             "lower the learning rate or check the data")
                total = loss
                for extra in hooks("extra_loss"):
                    term = extra(model)
                    if term is not None:
                        total = total + term
                opt.zero_grad(set_to_none=True)
                total.backward()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                step += 1
                for after in hooks("after_step"):
                    after(model, step)
                n = y.numel()
                pred = logits.detach().flatten(0, -2).argmax(-1) if logits.dim() == 3 else logits.detach().argmax(1)
                sums["loss"] += loss.item() * n
                sums["correct"] += (pred == y.flatten() if logits.dim() == 3 else pred == y).sum().item()
                sums["count"] += n
                mean_loss, mean_acc = sums["loss"] / sums["count"], 100 * sums["correct"] / sums["count"]
                advance(1, f"loss {mean_loss:.3f} acc {mean_acc:.1f}% lr {lr:.2g}")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    checkpoint()
        for after in hooks("after_epoch"):
            after(model, epoch)
        if avg is not None and epoch >= n_epochs - cfg.swa_epochs:
            avg.update_parameters(model)
        record = {"epoch": epoch + 1, "step": step, "train_loss": sums["loss"] / max(1, sums["count"]),
                  "train_acc": 100 * sums["correct"] / max(1, sums["count"]),
                  "epoch_seconds": time.perf_counter() - t0}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == n_epochs:
            record.update({f"test_{k}": v for k, v in evaluate(model, test, device, channels_last).items()})
        history.append(record)
        sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        checkpoint()
        if out is not None:
            _write_jsonl(out / "metrics.jsonl", history)
    if avg is not None:  # the average replaces the last iterate; its BN statistics come from one pass over the
        # training data (augmented, as the averaged iterates saw it; batches of the epoch after the last: deterministic)
        update_bn((_prepare(x, device, channels_last) for x, _ in train.batches(n_epochs)), avg)
        model.load_state_dict(avg.module.state_dict())
    ends = hooks("on_fit_end")
    for end in ends:  # e.g. a last distortion or a quantizer freeze: the final evaluation must see it
        end(model)
    last_iterate = {k: v for k, v in history[-1].items() if k.startswith("test_")} if history else {}
    final = last_iterate if not ends and avg is None else {}
    if not final:
        final = {f"test_{k}": v for k, v in evaluate(model, test, device, channels_last).items()}
    if out is not None:
        extra = {"swa": {"epochs": cfg.swa_epochs, "last_iterate": last_iterate}} if avg is not None else {}
        save_model(out / "model.safetensors", model, dataset=data.name, results=final,
                   input_shape=list(data.input_shape), train=cfg.model_dump(mode="json"), **extra)
    return FitResult(history, final, out)


def _write_jsonl(path: Path, rows: list[dict[str, float]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
