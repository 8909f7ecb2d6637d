"""Training substrate: the engine, its typed config, schedules and checkpoints."""

from lowbit.train.checkpoint import Checkpoint, CheckpointError, load_checkpoint, load_model, save_checkpoint
from lowbit.train.config import TrainConfig
from lowbit.train.engine import Callback, FitResult, evaluate, fit, save_model

__all__ = [
    "Callback", "Checkpoint", "CheckpointError", "FitResult", "TrainConfig", "evaluate", "fit",
    "load_checkpoint", "load_model", "save_checkpoint", "save_model",
]
