"""Knowledge distillation: Hinton KD, FSP matrices, Polino's quantized distillation and differentiable quantization.

    fit(student, data, cfg, callbacks=[KnowledgeDistillation(teacher, temperature=4, alpha=0.9)])
    fsp_train(student, FSPDistillation(teacher), data, stage1_cfg, stage2_cfg)
    quantize_bucketed_(student, bits=4); fit(student, data, cfg, callbacks=[KnowledgeDistillation(teacher)])

The callbacks replace the engine's cross-entropy through the ``task_loss`` hook of :func:`lowbit.train.fit`.
"""

from lowbit.distill.fsp import (
    FSPDistillation,
    FSPRecorder,
    fsp_loss,
    fsp_matrices,
    fsp_matrix,
    fsp_train,
    stage_modules,
)
from lowbit.distill.kd import KnowledgeDistillation, kd_loss, run_teacher
from lowbit.distill.polino import bucketed_config, quantization_points, quantize_bucketed_, train_points_only

__all__ = [
    "FSPDistillation", "FSPRecorder", "KnowledgeDistillation", "bucketed_config", "fsp_loss", "fsp_matrices",
    "fsp_matrix", "fsp_train", "kd_loss", "quantization_points", "quantize_bucketed_", "run_teacher",
    "stage_modules", "train_points_only",
]
