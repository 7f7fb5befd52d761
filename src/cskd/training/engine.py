"""The optimisation step: one batch in, the loss parts out.

``Trainer.step`` normalises, erases and mixes a loader batch once on the device (for the student
and the teacher alike, or reads the teacher's targets from a cache), runs the
:class:`~cskd.method.distiller.Distiller` under autocast, stops on a non-finite loss (agreed by
all ranks), updates the weights, the EMA and the learning rate, and returns the loss parts. The
epoch loop around it (logging, checkpoints, stop requests) is
:meth:`cskd.training.run.EpochLoop.train_one_epoch`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import NonFiniteLossError
from ..infra.distributed import all_reduce_sum
from ..method.adapters import TeacherOutput
from ..method.distiller import Distiller
from ..method.schedules import training_progress
from ..teacher.cached import CachedTeacher, mix_with_partner_weights
from .state import TrainState


@dataclass
class Trainer:
    """What one optimisation step needs, and the step."""

    distiller: Distiller
    optimizer: torch.optim.Optimizer
    scheduler: object  # a timm scheduler stepped per update
    device: torch.device
    epochs: int
    steps_per_epoch: int
    progress_unit: str
    mixup: Callable | None = None
    erasing: Callable | None = None
    ema: nn.Module | None = None
    scaler: torch.amp.GradScaler | None = None
    amp_dtype: torch.dtype | None = None
    clip_grad: float = 0.0
    student_norm: tuple[torch.Tensor, torch.Tensor] | None = None
    cached_teacher: CachedTeacher | None = None  # teacher targets from a cache (teacher.cache)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def prepare(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, TeacherOutput | None]:
        """Normalise, erase and mix a loader batch on the device, once, for student and teacher.
        With a cached teacher, also its targets for the batch's crops, flips and mixing."""
        images = batch["image"].to(self.device, non_blocking=True)
        targets = batch["target"].to(self.device, non_blocking=True)
        mean, std = self.student_norm
        images = (images - mean) / std
        if self.erasing is not None:
            images = self.erasing(images)
        if self.cached_teacher is None:
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            return images, targets, None
        partner = None
        if self.mixup is not None:
            images, targets, partner = mix_with_partner_weights(self.mixup, images, targets)
        teacher_output = self.cached_teacher(
            index=batch["index"], crop=batch["crop"], flip=batch["flip"], partner=partner
        )
        return images, targets, teacher_output

    def step(self, batch: dict, state: TrainState) -> dict:
        progress = training_progress(
            epoch=state.epoch,
            step_in_epoch=state.step_in_epoch,
            steps_per_epoch=self.steps_per_epoch,
            epochs=self.epochs,
            unit=self.progress_unit,
        )
        images, targets, teacher_output = self.prepare(batch)
        with self.autocast():
            loss, parts = self.distiller(images, targets, progress, teacher_output)
        # summed over ranks: a non-finite loss on any rank stops every rank at this same step
        if not math.isfinite(all_reduce_sum(loss.detach().float().reshape(1).clone()).item()):
            shown = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
            where = "" if not math.isfinite(loss.item()) else " (on another rank)"
            raise NonFiniteLossError(
                f"non-finite loss{where} at step {state.global_step + 1} (epoch {state.epoch}): "
                f"{shown}; the last checkpoint is untouched (lower optim.lr, set optim.clip_grad "
                "or use bf16)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.clip_grad > 0:
            nn.utils.clip_grad_norm_(self.distiller.student.parameters(), self.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(unwrap(self.distiller.student), step=state.global_step)
        state.step_in_epoch += 1
        state.global_step += 1
        # the schedule's position in this run's steps (global_step also counts the steps of a
        # resumed run that used another global batch)
        self.scheduler.step_update(
            num_updates=state.epoch * self.steps_per_epoch + state.step_in_epoch
        )
        parts["progress"] = progress
        return parts


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") else module
