"""Knowledge distillation with soft targets (Hinton, Vinyals, Dean 2015).

    L = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

``z_t`` are the teacher's logits (eval mode, no gradient), ``z_s`` the student's, ``T`` the temperature.
The soft term's gradient with respect to a student logit is ``T (softmax(z_s/T) - softmax(z_t/T))``; for a
large T this tends to ``(z_s - z_t) / C`` (C classes, zero-mean logits), so the ``T^2`` factor keeps the
soft and hard terms on comparable scales whatever the temperature (the paper, section 2).

:class:`KnowledgeDistillation` is a callback for :func:`lowbit.train.fit`: its ``task_loss`` replaces the
engine's cross-entropy by this loss. Trained on a quantized model (``lowbit.quant.quantize_``), it is
Polino et al.'s quantized distillation: the loss is computed on the quantized student and its gradient
trains the float shadow weights through the quantizers' straight-through estimators.

References:
    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", arXiv:1503.02531.
    Polino, Pascanu, Alistarh, "Model compression via distillation and quantization", arXiv:1802.05668.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["kd_loss", "KnowledgeDistillation", "check_temperature_alpha", "run_teacher"]


def check_temperature_alpha(temperature: float, alpha: float) -> None:
    """Raise a ``ValueError`` unless ``temperature > 0`` (finite) and ``0 <= alpha <= 1``."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha (the weight of the soft-target term) must be in [0, 1], got {alpha!r}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
            temperature: float = 4.0, alpha: float = 0.9) -> torch.Tensor:
    """Hinton et al.'s distillation loss, averaged over the batch.

    Formula: ``alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE(z_s, y)``, the KL summed
    over classes and both terms averaged over the rows (samples; for ``(B, L, C)`` logits, every position).
    Gradient: with respect to ``z_s``, per row and divided by the number of rows,
    ``alpha * T * (softmax(z_s/T) - softmax(z_t/T)) + (1 - alpha) * (softmax(z_s) - onehot(y))``; none to
    ``z_t`` (it is detached).

    Args:
        student_logits: ``(B, C)`` or ``(B, L, C)`` logits of the student.
        teacher_logits: logits of the teacher, the same shape.
        target: class indices, ``(B,)`` or ``(B, L)``.
        temperature: T > 0 (default 4).
        alpha: weight of the soft-target term in [0, 1] (default 0.9); 0 gives plain cross-entropy.

    Example:
        >>> z = torch.tensor([[2.0, 0.0, -1.0]])
        >>> y = torch.tensor([0])
        >>> kd_loss(z, z, y, temperature=3.0, alpha=1.0)  # same logits: no soft-target loss
        tensor(0.)
        >>> bool(kd_loss(z, z.flip(1), y, alpha=0.0) == F.cross_entropy(z, y))
        True

    References:
        Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", arXiv:1503.02531.
    """
    check_temperature_alpha(temperature, alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} differ: distillation needs the same output "
                         "(the same number of classes) from both")
    if student_logits.dim() not in (2, 3):
        raise ValueError(f"logits must be (batch, classes) or (batch, length, classes), got "
                         f"{tuple(student_logits.shape)}")
    zs = student_logits.flatten(0, -2)  # (rows, C)
    zt = teacher_logits.detach().flatten(0, -2).to(zs.dtype)
    y = target.flatten()
    if y.numel() != zs.shape[0]:
        raise ValueError(f"target {tuple(target.shape)} does not match logits {tuple(student_logits.shape)}")
    t = float(temperature)
    soft = F.kl_div(F.log_softmax(zs / t, dim=1), F.log_softmax(zt / t, dim=1), reduction="batchmean",
                    log_target=True)
    loss = (alpha * t * t) * soft
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(zs, y)
    return loss


def _teacher_device(teacher: nn.Module) -> torch.device | None:
    p = next(iter(teacher.parameters()), None)
    return None if p is None else p.device


class KnowledgeDistillation:
    """Training callback: the student learns from a teacher's soft targets (see :func:`kd_loss`).

    Used as ``fit(student, data, cfg, callbacks=[KnowledgeDistillation(teacher, 4.0, 0.9)])``. Its
    ``task_loss(model, x, y, logits)`` runs the teacher on the same (augmented) batch in eval mode under
    ``torch.no_grad`` and returns ``kd_loss(logits, teacher(x), y, T, alpha)`` in place of the cross-entropy.
    The teacher is moved to the batch's device at its first use; its weights never change.

    Args:
        teacher: the trained teacher network (same number of outputs as the student).
        temperature: T > 0 (default 4).
        alpha: weight of the soft-target term in [0, 1] (default 0.9).

    Example:
        >>> teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
        >>> kd = KnowledgeDistillation(teacher, temperature=2.0, alpha=0.5)
        >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
        >>> kd.task_loss(student, x, y, student(x)).shape
        torch.Size([])

    References:
        Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", arXiv:1503.02531.
    """

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9) -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        check_temperature_alpha(temperature, alpha)
        self.teacher, self.temperature, self.alpha = teacher, float(temperature), float(alpha)

    def on_fit_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if model is self.teacher:
            raise ValueError("the teacher is the student itself; distill from a separate (copied) model")

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for ``x`` (eval mode, no gradient)."""
        return run_teacher(self.teacher, x)

    def task_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return kd_loss(logits, self.teacher_logits(x), y, self.temperature, self.alpha)

    def __repr__(self) -> str:
        return f"KnowledgeDistillation(temperature={self.temperature}, alpha={self.alpha})"


def run_teacher(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``teacher(x)`` in eval mode under ``torch.no_grad``, the teacher moved to ``x``'s device if needed."""
    if teacher.training:
        teacher.eval()
    device = _teacher_device(teacher)
    if device is not None and device != x.device:
        teacher.to(x.device)
    with torch.no_grad():
        return teacher(x)
