"""One training epoch and one evaluation pass.

``Distiller`` owns the student, the frozen teacher and the objective: it gives the teacher exactly
the (augmented, erased, mixed) batch the student sees, renormalised to the teacher's own mean and
std. ``Trainer`` runs the optimisation steps; ``evaluate`` measures top-1/top-5 per inference rule.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from .cached_teacher import CachedTeacher, mix_with_partner_weights
from .distributed import all_reduce_sum
from .losses import ObjectiveWeights, objective
from .models import DenseTeacher, TeacherOutput, combine_heads
from .schedules import local_weight, training_progress

log = logging.getLogger("cskd")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the loss parts."""


def normalizer(mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, len(mean), 1, 1)
    return (
        torch.tensor(mean, device=device).view(shape),
        torch.tensor(std, device=device).view(shape),
    )


class Distiller(nn.Module):
    """Student + frozen teacher + objective. ``student`` may be wrapped in DDP; the teacher is not."""

    def __init__(
        self,
        student: nn.Module,
        teacher: DenseTeacher | None,
        weights: ObjectiveWeights,
        *,
        student_norm: tuple[torch.Tensor, torch.Tensor],
        teacher_norm: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.weights = weights
        if teacher is not None:
            # x_teacher = (x_student * std_s + mean_s - mean_t) / std_t = x_student * scale + shift
            (mean_s, std_s), (mean_t, std_t) = student_norm, teacher_norm
            self.register_buffer("teacher_scale", std_s / std_t, persistent=False)
            self.register_buffer("teacher_shift", (mean_s - mean_t) / std_t, persistent=False)

    def forward(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        progress: float,
        teacher_output: TeacherOutput | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """images: (N, C, S, S) normalised for the student; targets: (N,) or (N, K) soft.
        ``teacher_output``: the teacher's responses for this batch when they come from a cache
        (:class:`~cskd.cached_teacher.CachedTeacher`); the teacher then does not run."""
        if self.weights.method == "none":
            output = self.student(images, with_patches=False)
            return objective(cls_logits=output.cls_logits, targets=targets, weights=self.weights)
        teacher = teacher_output
        if teacher is None:
            teacher = self.teacher(images * self.teacher_scale + self.teacher_shift)
        dense = self.weights.method == "cskd"
        output = self.student(
            images,
            output_grid=tuple(teacher.dense_logits.shape[-2:]) if dense else None,
            with_patches=dense,
        )
        return objective(
            cls_logits=output.cls_logits,
            dist_logits=output.dist_logits,
            student_patch_logits=output.patch_logits,
            teacher_dense_logits=teacher.dense_logits.float() if dense else None,
            teacher_global_logits=teacher.global_logits.float(),
            targets=targets,
            weights=self.weights,
            progress=progress,
            student_grid=output.patch_grid,
        )


@dataclass
class TrainState:
    epoch: int = 0  # the epoch being trained (counted from 0)
    step_in_epoch: int = 0  # optimisation steps already done in this epoch
    global_step: int = 0
    best_metric: float = -1.0
    best: dict = field(default_factory=dict)  # per rule: top1, top5, epoch of the best epoch
    # the epoch's loss parts summed so far, and over how many steps: saved in checkpoints so that
    # an epoch resumed mid-way reports the same training means as an uninterrupted one
    epoch_sums: dict = field(default_factory=dict)
    epoch_steps: int = 0


@dataclass
class Trainer:
    """The optimisation step and the epoch loop around it."""

    distiller: Distiller
    optimizer: torch.optim.Optimizer
    scheduler: object  # a timm scheduler stepped per update
    device: torch.device
    epochs: int
    steps_per_epoch: int
    progress_unit: str
    schedule: str
    mixup: Callable | None = None
    erasing: Callable | None = None
    ema: nn.Module | None = None
    scaler: torch.amp.GradScaler | None = None
    amp_dtype: torch.dtype | None = None
    clip_grad: float = 0.0
    student_norm: tuple[torch.Tensor, torch.Tensor] | None = None
    log_interval: int = 50
    show_progress: bool = False
    on_log: Callable[[dict], None] = lambda record: None
    should_stop: Callable[[], bool] = lambda: False
    on_checkpoint: Callable[[], None] = lambda: None
    checkpoint_interval: int = 0
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
            self.ema.update(_unwrap(self.distiller.student), step=state.global_step)
        state.step_in_epoch += 1
        state.global_step += 1
        # the schedule's position in this run's steps (global_step also counts the steps of a
        # resumed run that used another global batch)
        self.scheduler.step_update(
            num_updates=state.epoch * self.steps_per_epoch + state.step_in_epoch
        )
        parts["progress"] = progress
        parts.setdefault("local_weight", local_weight(progress, self.schedule))
        return parts

    def train_one_epoch(self, batches: Iterable[dict], state: TrainState) -> dict:
        """Train until the epoch's steps are done (or ``should_stop``); returns mean loss parts."""
        self.distiller.train()
        self.scheduler.step(state.epoch)  # an epoch-unit schedule moves here (a no-op per step)
        if state.step_in_epoch == 0:
            state.epoch_sums, state.epoch_steps = {}, 0
        sums = state.epoch_sums
        count = 0
        start, window_start, window_images = time.perf_counter(), time.perf_counter(), 0
        remaining = max(self.steps_per_epoch - state.step_in_epoch, 0)
        bar = tqdm(
            total=remaining,
            desc=f"epoch {state.epoch + 1}/{self.epochs}",
            disable=not self.show_progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        for batch in itertools.islice(batches, remaining):
            parts = self.step(batch, state)
            count += 1
            state.epoch_steps += 1
            window_images += batch["image"].shape[0]
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            lr = self.optimizer.param_groups[0]["lr"]
            if (
                state.global_step % self.log_interval == 0
                or state.step_in_epoch == self.steps_per_epoch
            ):
                now = time.perf_counter()
                record = {
                    "type": "step",
                    "epoch": state.epoch,
                    "step": state.global_step,
                    "lr": lr,
                    "images_per_s": window_images / max(now - window_start, 1e-9),
                    **{k: float(v) for k, v in parts.items()},
                }
                window_start, window_images = now, 0
                self.on_log(record)
                speed = f"{record['images_per_s']:.0f}"
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", img_s=speed, refresh=False
                )
                if not self.show_progress:  # not a terminal: one line per log interval
                    eta = (now - start) / count * (remaining - count)
                    log.info(
                        f"epoch {state.epoch + 1}/{self.epochs} step {state.step_in_epoch}/"
                        f"{self.steps_per_epoch} loss {record['loss']:.4f} lr {lr:.3g} "
                        f"{speed} img/s eta {eta:.0f}s"
                    )
            bar.update(1)
            if self.checkpoint_interval and state.global_step % self.checkpoint_interval == 0:
                self.on_checkpoint()
            if self.should_stop():
                break
        bar.close()
        means = {key: value / max(state.epoch_steps, 1) for key, value in sums.items()}
        means["epoch_time_s"] = time.perf_counter() - start
        return means


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") else module


@torch.no_grad()
def evaluate(
    student: nn.Module,
    loader: Iterable[dict],
    *,
    rules: tuple[str, ...],
    device: torch.device,
    student_norm: tuple[torch.Tensor, torch.Tensor],
    amp_dtype: torch.dtype | None = None,
    max_batches: int = 0,
) -> dict:
    """Top-1 and top-5 accuracy (percent) for each rule, summed over ranks.

    Returns ``{rule: {"top1", "top5"}, "images": n}``. Every validation image counts once: the
    loader's sampler must not pad (see :mod:`cskd.data`).
    """
    student = _unwrap(student)
    was_training = student.training
    student.eval()
    mean, std = student_norm
    counts = torch.zeros(len(rules), 2, dtype=torch.float64, device=device)  # (rules, top1/top5)
    images_seen = torch.zeros((), dtype=torch.float64, device=device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    for batch in itertools.islice(loader, max_batches or None):
        images = (batch["image"].to(device, non_blocking=True) - mean) / std
        targets = batch["target"].to(device, non_blocking=True)
        with autocast:
            output = student(images, output_grid=(1, 1))
        for row, rule in enumerate(rules):
            logits = combine_heads(output, rule).float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (N, 5)
            hits = top == targets[:, None]
            counts[row, 0] += hits[:, 0].sum()
            counts[row, 1] += hits.any(dim=1).sum()
        images_seen += targets.shape[0]
    all_reduce_sum(counts)
    all_reduce_sum(images_seen)
    student.train(was_training)
    total = max(images_seen.item(), 1.0)
    metrics = {
        rule: {
            "top1": 100.0 * counts[row, 0].item() / total,
            "top5": 100.0 * counts[row, 1].item() / total,
        }
        for row, rule in enumerate(rules)
    }
    metrics["images"] = int(images_seen.item())
    return metrics
