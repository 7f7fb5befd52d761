"""Evaluation: top-1/top-5 per inference rule (raw and EMA), after an epoch and in
``cskd eval``; the best epoch and the epoch's log line.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from timm.utils import ModelEmaV3
from torch import nn

from ..config import Config
from ..errors import NonFiniteError
from ..infra.distributed import all_reduce_sum
from ..method.adapters import DenseTeacher, combine_heads, rules_for
from ..method.schedules import training_progress
from . import diagnostics
from .engine import unwrap


@dataclass
class EpochEvaluation:
    """What is measured after an evaluated epoch: every rule (and the EMA) on the validation
    set, on the official test set with ``train.eval_test``, and the diagnostics probe."""

    config: Config
    student: torch.nn.Module
    ema: ModelEmaV3 | None
    teacher: DenseTeacher | None
    val_loader: Iterable[dict]
    test_loader: Iterable[dict] | None  # the official test split (train.eval_test), else None
    device: torch.device
    student_norm: tuple[torch.Tensor, torch.Tensor]
    amp_dtype: torch.dtype | None
    steps_per_epoch: int
    probe: diagnostics.Probe | None = None

    def run(self, *, epoch: int, with_diagnostics: bool = True) -> dict:
        """``{"eval": ..., "test": ... (optional), "diagnostics": ... (optional)}``."""
        val_loader, test_loader = self.val_loader, self.test_loader
        measure = dict(
            student=self.student,
            ema=self.ema,
            rules=rules_for(self.student),
            device=self.device,
            norm=self.student_norm,
            dtype=self.amp_dtype,
            config=self.config,
        )
        result = {"eval": evaluate_with_ema(loader=val_loader, **measure)}
        if test_loader is not None:  # reported, never used for a choice (best.pt follows val)
            result["test"] = evaluate_with_ema(loader=test_loader, **measure)
        if self.probe is not None and with_diagnostics:  # a(t) of the epoch just trained
            progress = training_progress(
                epoch=epoch,
                step_in_epoch=0,
                steps_per_epoch=self.steps_per_epoch,
                epochs=self.config.optim.epochs,
                unit=self.config.distill.progress,
            )
            result["diagnostics"] = self.probe.measure(
                self.student, self.teacher, progress=progress
            )
        return result


def evaluate_with_ema(student, ema, loader, rules, device, norm, dtype, config) -> dict:
    common = dict(
        loader=loader,
        rules=rules,
        device=device,
        student_norm=norm,
        amp_dtype=dtype,
        max_batches=config.train.eval_max_batches,
    )
    metrics = evaluate(student, **common)
    if ema is not None:
        metrics["ema"] = evaluate(ema.module, **common)
    return metrics


def update_best(best: dict, metrics: dict, *, epoch: int) -> None:
    """Keep, per rule (and per rule of the EMA weights under ``best["ema"]``), the epoch of the
    highest top-1 so far: ``{rule: {"top1", "top5", "epoch"}}``; ties keep the earlier epoch."""
    for rule, values in metrics.items():
        if rule == "images":
            continue
        if rule == "ema":
            update_best(best.setdefault("ema", {}), values, epoch=epoch)
        elif rule not in best or values["top1"] > best[rule]["top1"]:
            best[rule] = {"top1": values["top1"], "top5": values["top5"], "epoch": epoch}


def rule_top1(metrics: dict, rule: str) -> float:
    if rule.startswith("ema/"):
        return metrics["ema"][rule[4:]]["top1"] if "ema" in metrics else -math.inf
    return metrics[rule]["top1"] if rule in metrics else metrics["cls"]["top1"]


def epoch_line(
    epoch: int,
    epochs: int,
    train_means: dict,
    metrics: dict,
    *,
    split_images: int = 0,
    cap: int = 0,
) -> str:
    """The epoch's log line; ``metrics`` is empty for an epoch that was not evaluated. When the
    evaluation saw fewer than ``split_images`` (the validation split's size) because of
    ``cap`` (``train.eval_max_batches``), the line says so: its scores are of a part."""
    rules = [key for key in metrics if key not in ("images", "ema")]
    shown = " ".join(f"{rule} {metrics[rule]['top1']:.2f}" for rule in rules)
    if "ema" in metrics:
        shown += " | ema " + " ".join(
            f"{rule} {metrics['ema'][rule]['top1']:.2f}" for rule in rules
        )
    if metrics and cap and metrics["images"] < split_images:
        shown += (
            f" (on the first {metrics['images']} of {split_images} images: "
            f"train.eval_max_batches={cap})"
        )
    return (
        f"epoch {epoch + 1}/{epochs} loss {train_means.get('loss', float('nan')):.4f} "
        f"({train_means['epoch_time_s']:.0f}s)" + (f" | top-1 {shown}" if metrics else "")
    )


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
    student = unwrap(student)
    was_training = student.training
    student.eval()
    mean, std = student_norm
    counts = torch.zeros(len(rules), 2, dtype=torch.float64, device=device)  # (rules, top1/top5)
    # images seen, and images whose logits (under any rule) hold NaN or inf
    seen = torch.zeros(2, dtype=torch.float64, device=device)
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
        broken = torch.zeros(targets.shape[0], dtype=torch.bool, device=device)
        for row, rule in enumerate(rules):
            logits = combine_heads(output, rule).float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (N, 5)
            hits = top == targets[:, None]
            counts[row, 0] += hits[:, 0].sum()
            counts[row, 1] += hits.any(dim=1).sum()
            broken |= ~torch.isfinite(logits).all(dim=1)
        seen[0] += targets.shape[0]
        seen[1] += broken.sum()
    all_reduce_sum(counts)
    all_reduce_sum(seen)
    student.train(was_training)
    total, broken_images = max(seen[0].item(), 1.0), int(seen[1].item())
    if broken_images:  # a top-1 of NaN logits is a guess (argmax(NaN) is class 0)
        raise NonFiniteError(
            f"the student's outputs are not finite on {broken_images} of {int(total)} evaluation "
            "images: its weights have diverged (lower optim.lr or set optim.clip_grad)"
        )
    metrics = {
        rule: {
            "top1": 100.0 * counts[row, 0].item() / total,
            "top5": 100.0 * counts[row, 1].item() / total,
        }
        for row, rule in enumerate(rules)
    }
    metrics["images"] = int(seen[0].item())
    return metrics
