"""The typed training configuration (validated; unknown keys are errors)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["TrainConfig"]


class TrainConfig(BaseModel):
    """How to train: optimizer, schedule, budget, checkpointing. Every field has a unit in its name
    or its description; ``extra='forbid'`` turns a typo into an error naming the key."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    version: Literal[1] = 1
    epochs: float = Field(10, gt=0, description="training length in epochs (fractions allowed)")
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    quantizer_weight_decay: float = Field(
        0.0, ge=0, description="weight decay of the quantizers' own parameters (learned clip values, intervals, "
        "bases, scales); 0 by default: decay would shrink the learned ranges (QIL's c/d, PACT's alpha, TTQ's scales)")
    schedule: Literal["cosine", "step", "onecycle", "constant"] = "cosine"
    milestones: tuple[int, ...] = Field((), description="epochs at which the 'step' schedule decays")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float = Field(0.0, ge=0, description="max gradient norm; 0 disables")
    swa_epochs: int = Field(
        0, ge=0, description="stochastic weight averaging (Izmailov et al. 2018): the final model is the mean of the "
        "weights at the ends of the last swa_epochs epochs, its batch-norm statistics re-estimated on the training "
        "data; 0 disables. Pair it with a 'constant' (or cyclic) schedule, so that the averaged points differ")
    seed: int = 0
    augment: bool | None = Field(None, description="crop+flip; None = the data set's default")
    seq_len: int = Field(128, ge=2, description="window length for language models")
    checkpoint_every: int = Field(200, ge=0, description="steps between mid-epoch checkpoints; 0 = epoch ends only")
    eval_every: int = Field(1, ge=1, description="epochs between test-set evaluations")
    channels_last: bool = True
    device: str = "cpu"

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.schedule == "step" and not self.milestones:
            raise ValueError("schedule 'step' needs milestones (epochs at which to decay)")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing, got {list(self.milestones)}")
        if self.swa_epochs > math.ceil(self.epochs):
            raise ValueError(f"swa_epochs={self.swa_epochs} averages more epochs than the run has ({self.epochs:g})")
        return self
