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

from ..errors import NonFiniteError, NonFiniteLossError
from ..infra.distributed import all_reduce_sum
from ..infra.weights import non_finite
from ..method.adapters import TeacherOutput
from ..method.distiller import Distiller, teacher_responses
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
    teacher_source: str = "the teacher"  # how an error names it (its name and file)

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
            if teacher_output is None:
                teacher_output = self.online_teacher(images)
            loss, parts = self.distiller(images, targets, progress, teacher_output)
        # one sync, summed over ranks: the loss, and the teacher's non-finite outputs (hard
        # targets would take argmax(NaN) = class 0 and train on, with a finite loss)
        bad = teacher_non_finite(teacher_output, device=loss.device)
        checks = torch.stack([loss.detach().float(), bad])
        loss_sum, teacher_bad = all_reduce_sum(checks).tolist()
        where = f"at step {state.global_step + 1} (epoch {state.epoch})"
        if not math.isfinite(loss_sum):
            shown = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
            other = "" if not math.isfinite(loss.item()) else " (on another rank)"
            teacher_too = "; the teacher's outputs too (NaN or inf in the images?)"
            raise NonFiniteLossError(
                f"non-finite loss{other} {where}: {shown}{teacher_too if teacher_bad else ''} "
                "(lower optim.lr, set optim.clip_grad or use bf16)"
            )
        if teacher_bad:
            raise NonFiniteError(
                f"{self.teacher_source} gave outputs that are not finite {where}: its weights "
                "hold NaN or inf, or its logits overflow float16 (use train.amp=bf16 or none)"
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

    def online_teacher(self, images: torch.Tensor) -> TeacherOutput | None:
        """The frozen teacher's output for the batch the student sees (in the teacher's own
        normalisation), or None without a teacher (``distill.method=none``)."""
        teacher = self.distiller.teacher
        if teacher is None or self.distiller.weights.method == "none":
            return None
        mean, std = self.distiller.student_mean, self.distiller.student_std
        return teacher_responses(teacher, images, mean=mean, std=std)

    def weights_finite(self) -> bool:
        """Whether every weight of the student (and its EMA) is finite: one pass over them and
        one sync, run at each log interval (``Checkpoints.save`` checks again before writing)."""
        modules = [unwrap(self.distiller.student)]
        if self.ema is not None:
            modules.append(self.ema.module)
        return not any(non_finite(module.state_dict()) for module in modules)


def teacher_non_finite(output: TeacherOutput | None, *, device: torch.device) -> torch.Tensor:
    """How many of the teacher's logits (global and dense) are NaN or inf: a 0-d float32
    tensor on ``device``, computed without a sync."""
    if output is None:
        return torch.zeros((), dtype=torch.float32, device=device)
    count = (~torch.isfinite(output.global_logits)).sum()
    if output.dense_logits is not None:
        count = count + (~torch.isfinite(output.dense_logits)).sum()
    return count.float()


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") else module
