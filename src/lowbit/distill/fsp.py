"""FSP matrices, "A Gift from Knowledge Distillation" (Yim, Joo, Bae, Kim, CVPR 2017).

The flow of solution procedure (FSP) between two feature maps of the same resolution, ``F1`` of shape
``(h, w, m)`` and ``F2`` of shape ``(h, w, n)``, is the ``m x n`` matrix

    G_ij(x) = sum_{s,t} F1_{s,t,i}(x) F2_{s,t,j}(x) / (h w)

and the student learns the teacher's flows by minimizing, over the N samples of a batch and the paired
points i (equal weights lambda_i = 1 by default, as in the paper),

    L_FSP = (1/N) sum_x sum_i lambda_i || G_i^T(x) - G_i^S(x) ||_2^2

Where: one matrix per ResNet stage, between the feature map entering the stage and the one leaving it.
Here a paired point is a module (by name): ``F1`` is its input, ``F2`` its output, recorded by forward
hooks; for lowbit's CIFAR ResNets the stages ``layer1``, ``layer2``, ``layer3`` are found automatically.
A stage that downsamples (stride 2) has an input twice the size of its output: the larger map is
average-pooled to the smaller one's size (``pool=True``, the default; ``pool=False`` makes it an error).
Teacher and student may differ in depth and spatial size, but at each paired point they need the same
channel counts (``m``, ``n``): otherwise the matrices cannot be compared, which is an error naming the pair.

Training (the paper's two stages, :func:`fsp_train`): stage 1 minimizes ``L_FSP`` only (the student's
classifier is not trained), stage 2 trains the student on the task loss alone from those weights.

References:
    Yim, Joo, Bae, Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and
    Transfer Learning", CVPR 2017 (no arXiv version).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.data import Dataset
from lowbit.distill.kd import run_teacher
from lowbit.train import FitResult, TrainConfig, fit

__all__ = ["fsp_matrix", "fsp_loss", "stage_modules", "FSPRecorder", "fsp_matrices", "FSPDistillation", "fsp_train"]

_STAGE = re.compile(r"layer(\d+)")


def fsp_matrix(f1: torch.Tensor, f2: torch.Tensor, pool: bool = True) -> torch.Tensor:
    """The FSP matrix of two feature maps, per sample.

    Formula: ``G_ij = sum_{s,t} F1[b, i, s, t] F2[b, j, s, t] / (h w)``, shape ``(B, m, n)`` for ``F1`` of
    shape ``(B, m, h, w)`` and ``F2`` of shape ``(B, n, h, w)``. If the spatial sizes differ and ``pool``
    is set, the larger map is first average-pooled (``adaptive_avg_pool2d``) to the smaller one's size.
    Gradient: exact (autograd through the product and the pooling).

    Args:
        f1: ``(B, m, h1, w1)``, the first feature map (e.g. a stage's input).
        f2: ``(B, n, h2, w2)``, the second (e.g. the stage's output).
        pool: average-pool the larger map when the sizes differ (default); False: raise instead.

    Example:
        >>> f = torch.ones(1, 2, 4, 4)
        >>> fsp_matrix(f, 3 * f)
        tensor([[[3., 3.],
                 [3., 3.]]])

    References:
        Yim et al., "A Gift from Knowledge Distillation", CVPR 2017.
    """
    if f1.dim() != 4 or f2.dim() != 4:
        raise ValueError(f"FSP matrices pair 4-D feature maps (batch, channels, height, width); got shapes "
                         f"{tuple(f1.shape)} and {tuple(f2.shape)}")
    if f1.shape[0] != f2.shape[0]:
        raise ValueError(f"the two feature maps hold different batch sizes: {f1.shape[0]} and {f2.shape[0]}")
    s1, s2 = tuple(f1.shape[-2:]), tuple(f2.shape[-2:])
    if s1 != s2:
        if not pool:
            raise ValueError(f"feature maps of different spatial sizes {s1} and {s2}; FSP needs the same "
                             "resolution: pass pool=True to average-pool the larger one")
        if s1[0] >= s2[0] and s1[1] >= s2[1]:
            f1 = F.adaptive_avg_pool2d(f1, s2)
        elif s2[0] >= s1[0] and s2[1] >= s1[1]:
            f2 = F.adaptive_avg_pool2d(f2, s1)
        else:
            raise ValueError(f"feature maps of spatial sizes {s1} and {s2}: neither is at least as large as the "
                             "other in both dimensions, so neither can be pooled to the other")
    h, w = f1.shape[-2:]
    return torch.einsum("bihw,bjhw->bij", f1, f2) / (h * w)


def _check_weights(weights: Sequence[float] | None) -> list[float] | None:
    if weights is None:
        return None
    out = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"FSP weights must be finite numbers >= 0, got {list(weights)!r}")
        out.append(float(w))
    return out


def fsp_loss(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
             weights: Sequence[float] | None = None, names: Sequence[str] | None = None) -> torch.Tensor:
    """The FSP loss between the teacher's and the student's matrices.

    Formula: ``sum_i lambda_i mean_b ||G_i^T[b] - G_i^S[b]||_F^2`` (squared entries summed per matrix,
    averaged over the batch); ``lambda_i = 1`` unless ``weights`` is given.
    Gradient: ``2 lambda_i (G_i^S - G_i^T) / B`` to each student matrix; none to the teacher's (detached).

    Args:
        teacher: one ``(B, m_i, n_i)`` matrix per paired point (see :func:`fsp_matrix`).
        student: the student's matrices, same count and shapes.
        weights: optional ``lambda_i >= 0``, one per pair.
        names: optional names of the pairs, for the error messages.

    Example:
        >>> g = torch.zeros(2, 3, 4)
        >>> fsp_loss([g], [g + 0.5])  # 12 entries * 0.25
        tensor(3.)

    References:
        Yim et al., "A Gift from Knowledge Distillation", CVPR 2017.
    """
    if len(teacher) != len(student) or not teacher:
        raise ValueError(f"got {len(teacher)} teacher and {len(student)} student FSP matrices; "
                         "they pair one to one (and at least one pair is needed)")
    lam = _check_weights(weights) or [1.0] * len(teacher)
    if len(lam) != len(teacher):
        raise ValueError(f"{len(lam)} weights for {len(teacher)} FSP pairs; give one weight per pair")
    total = student[0].new_zeros(())
    for i, (gt, gs) in enumerate(zip(teacher, student, strict=True)):
        label = f"pair {i}" + (f" ({names[i]})" if names is not None and i < len(names) else "")
        if gt.shape != gs.shape:
            if gt.dim() == 3 and gs.dim() == 3 and gt.shape[0] == gs.shape[0]:
                raise ValueError(
                    f"FSP {label}: the teacher's matrix is {gt.shape[1]}x{gt.shape[2]} (channels in x out), the "
                    f"student's {gs.shape[1]}x{gs.shape[2]}: paired feature maps need the same channel counts; "
                    "pair other modules (student_modules= / teacher_modules=)")
            raise ValueError(f"FSP {label}: teacher matrices {tuple(gt.shape)} and student matrices "
                             f"{tuple(gs.shape)} differ (expected (batch, m, n) for both)")
        total = total + lam[i] * (gt.detach().to(gs.dtype) - gs).pow(2).sum(dim=(1, 2)).mean()
    return total


def stage_modules(model: nn.Module) -> list[str]:
    """The names of ``model``'s stages: its direct children called ``layer1``, ``layer2``, ... in order.

    Raises a ``ValueError`` naming the children when there is none (then name the modules yourself).

    Example:
        >>> from lowbit.models import create_model
        >>> stage_modules(create_model("resnet20"))
        ['layer1', 'layer2', 'layer3']
    """
    found = sorted(((int(m.group(1)), name) for name, _ in model.named_children()
                    if (m := _STAGE.fullmatch(name))))
    if not found:
        children = ", ".join(name for name, _ in model.named_children()) or "none"
        raise ValueError(f"{type(model).__name__} has no stage modules named layer1, layer2, ...; name the modules "
                         f"whose input and output to pair (its children: {children})")
    return [name for _, name in found]


def _modules(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    table = dict(model.named_modules())
    missing = [n for n in names if n not in table or n == ""]
    if missing:
        import difflib

        hints = [f"{n!r}" + (f" (did you mean {close[0]!r}?)"
                             if (close := difflib.get_close_matches(n, list(table), n=1)) else "") for n in missing]
        raise ValueError(f"{type(model).__name__} has no module {', '.join(hints)}; its top-level modules: "
                         f"{', '.join(n for n, _ in model.named_children())}")
    return [table[n] for n in names]


class FSPRecorder:
    """Forward hooks that record, at each forward, the FSP matrix between a module's input and output.

    ``take()`` returns the matrices of the last forward in the order of ``modules`` and clears them. A module
    that modified its input in place (so the input is gone when the output exists) is an error. Hooks
    record while the module is in training mode, or always with ``record_in_eval`` (a teacher).
    Use as a context manager, or ``attach()`` / ``remove()``.

    Args:
        model: the network.
        modules: module names (``"layer1"``, ``"layer2.0"``); None: :func:`stage_modules`.
        pool: see :func:`fsp_matrix`.
        record_in_eval: also record in eval mode.

    Example:
        >>> from lowbit.models import create_model
        >>> net = create_model("resnet20")
        >>> with FSPRecorder(net) as rec:
        ...     _ = net(torch.randn(2, 3, 32, 32))
        ...     [tuple(g.shape) for g in rec.take()]
        [(2, 16, 16), (2, 16, 32), (2, 32, 64)]
    """

    def __init__(self, model: nn.Module, modules: Sequence[str] | None = None, pool: bool = True,
                 record_in_eval: bool = False) -> None:
        self.names = list(modules) if modules is not None else stage_modules(model)
        if not self.names:
            raise ValueError("no modules to pair: give at least one module name")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"a module is named twice in {self.names}")
        self.modules = _modules(model, self.names)
        self.pool, self.record_in_eval = pool, record_in_eval
        self.matrices: dict[str, torch.Tensor] = {}
        self._versions: dict[str, int] = {}
        self._handles: list[Any] = []

    def attach(self) -> FSPRecorder:
        self.remove()
        for name, module in zip(self.names, self.modules, strict=True):
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name)))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.matrices.clear()

    def __enter__(self) -> FSPRecorder:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _recording(self, module: nn.Module) -> bool:
        return module.training or self.record_in_eval

    def _pre(self, name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if self._recording(module) and args and isinstance(args[0], torch.Tensor):
                self._versions[name] = args[0]._version

        return hook

    def _post(self, name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self._recording(module):
                return
            if not (args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor)):
                raise TypeError(f"FSP point {name!r} ({type(module).__name__}) must take a tensor as its first "
                                "positional argument and return a tensor")
            x = args[0]
            if x._version != self._versions.get(name, x._version):
                raise RuntimeError(f"FSP point {name!r} ({type(module).__name__}) modified its input in place, so "
                                   "the input is lost; pair a module that does not (or turn off its inplace ops)")
            if name in self.matrices:
                raise RuntimeError(f"FSP point {name!r} ran twice before its matrix was taken (a shared module?); "
                                   "pair modules that run once per forward")
            try:
                self.matrices[name] = fsp_matrix(x, output, self.pool)
            except ValueError as e:
                raise ValueError(f"FSP point {name!r} ({type(module).__name__}): {e}") from None

        return hook

    def take(self) -> list[torch.Tensor]:
        """The matrices of the last forward, in the order of ``names``; clears them."""
        missing = [n for n in self.names if n not in self.matrices]
        if missing:
            raise RuntimeError(f"FSP points {missing} did not run in the last forward (or the hooks are not "
                               "attached, or the model ran in eval mode)")
        out = [self.matrices[n] for n in self.names]
        self.matrices.clear()
        return out


def fsp_matrices(model: nn.Module, x: torch.Tensor, modules: Sequence[str] | None = None,
                 pool: bool = True) -> list[torch.Tensor]:
    """Run ``model(x)`` and return the FSP matrix (input x output) of each module in ``modules``.

    Example:
        >>> from lowbit.models import create_model
        >>> net = create_model("resnet20").eval()
        >>> [tuple(g.shape) for g in fsp_matrices(net, torch.randn(1, 3, 32, 32))]
        [(1, 16, 16), (1, 16, 32), (1, 32, 64)]
    """
    with FSPRecorder(model, modules, pool, record_in_eval=True) as rec:
        model(x)
        return rec.take()


class FSPDistillation:
    """Training callback for stage 1 of FSP distillation: the loss is ``L_FSP`` only (see :func:`fsp_loss`).

    Formula: ``task_loss = sum_i lambda_i mean_b ||G_i^T - G_i^S||^2``, with the student's matrices recorded
    during its forward (training mode) and the teacher's from the same batch (eval mode, no gradient).
    The engine's cross-entropy is not used; the student's classifier gets no gradient. Stage 2 is a plain
    :func:`lowbit.train.fit` (see :func:`fsp_train`).

    Args:
        teacher: the trained teacher.
        student_modules: the student's paired modules (input x output); None: its ``layer1``, ``layer2``, ...
        teacher_modules: the teacher's, the same count; None: ``student_modules`` if given, else the teacher's
            stages.
        weights: ``lambda_i`` per pair (default: all 1, as the paper).
        pool: average-pool a stage's larger input to its output's size (default True); False: an error.

    Example:
        >>> from lowbit.models import create_model
        >>> teacher, student = create_model("resnet32"), create_model("resnet20")
        >>> fsp = FSPDistillation(teacher)
        >>> fsp.attach(student)
        >>> x = torch.randn(2, 3, 32, 32)
        >>> loss = fsp.task_loss(student, x, torch.tensor([0, 1]), student(x))
        >>> fsp.remove(); loss.dim()
        0

    References:
        Yim et al., "A Gift from Knowledge Distillation", CVPR 2017.
    """

    def __init__(self, teacher: nn.Module, student_modules: Sequence[str] | None = None,
                 teacher_modules: Sequence[str] | None = None, weights: Sequence[float] | None = None,
                 pool: bool = True) -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        self.teacher = teacher
        self.student_modules = None if student_modules is None else list(student_modules)
        self.teacher_modules = list(teacher_modules) if teacher_modules is not None else self.student_modules
        self.weights = _check_weights(weights)
        self.pool = pool
        self._student: FSPRecorder | None = None
        self._teacher = FSPRecorder(teacher, self.teacher_modules, pool, record_in_eval=True)

    def attach(self, model: nn.Module) -> None:
        """Hook the student ``model`` and the teacher (``fit`` does it at ``on_fit_start``)."""
        if model is self.teacher:
            raise ValueError("the teacher is the student itself; distill from a separate (copied) model")
        self.remove()
        student = FSPRecorder(model, self.student_modules, self.pool)
        if len(student.names) != len(self._teacher.names):
            raise ValueError(f"{len(student.names)} student FSP points {student.names} but {len(self._teacher.names)} "
                             f"teacher points {self._teacher.names}: they pair one to one")
        if self.weights is not None and len(self.weights) != len(student.names):
            raise ValueError(f"{len(self.weights)} weights for {len(student.names)} FSP pairs")
        self._student = student.attach()
        self._teacher.attach()

    def remove(self) -> None:
        """Remove the hooks (``fit`` does it at ``on_fit_end``)."""
        if self._student is not None:
            self._student.remove()
            self._student = None
        self._teacher.remove()

    def on_fit_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.attach(model)

    def on_fit_end(self, model: nn.Module) -> None:
        self.remove()

    def task_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self._student is None:
            raise RuntimeError("FSPDistillation is not attached to a student: call attach(model) first "
                               "(fit does it through on_fit_start)")
        student = self._student.take()
        run_teacher(self.teacher, x)
        teacher = self._teacher.take()
        names = [f"student {s} / teacher {t}" for s, t in zip(self._student.names, self._teacher.names, strict=True)]
        return fsp_loss(teacher, student, self.weights, names)

    def __repr__(self) -> str:
        return (f"FSPDistillation(student_modules={self.student_modules}, teacher_modules={self.teacher_modules}, "
                f"weights={self.weights}, pool={self.pool})")


def fsp_train(student: nn.Module, fsp: FSPDistillation, data: Dataset, stage1: TrainConfig, stage2: TrainConfig,
              run_dir: str | os.PathLike[str] | None = None, resume: bool = False, callbacks: Sequence[object] = (),
              show_progress: bool = True) -> tuple[FitResult, FitResult]:
    """The paper's two-stage procedure: ``stage1`` minimizes the FSP loss, then ``stage2`` the task loss.

    Both stages are :func:`lowbit.train.fit` runs (checkpoints in ``run_dir/fsp`` and ``run_dir/task``,
    each resumable with ``resume=True``); ``callbacks`` (e.g. pruning masks) take part in both. Returns the
    two :class:`~lowbit.train.FitResult`; the second's ``final`` holds the student's test accuracy.

    References:
        Yim et al., "A Gift from Knowledge Distillation", CVPR 2017.
    """
    out = Path(run_dir) if run_dir is not None else None
    first = fit(student, data, stage1, out / "fsp" if out else None, resume, [*callbacks, fsp], show_progress)
    second = fit(student, data, stage2, out / "task" if out else None, resume, list(callbacks), show_progress)
    return first, second
