"""Cumulative Knowledge Fusion (CKF) schedules: the weight a(t) of the teacher's local response.

The fused target at every location of the teacher grid is

    a(t) * P_local + (1 - a(t)) * P_global

with t the training progress in [0, 1]. The paper's schedules fall from 1 to 0; ``dense`` and
``global`` hold a(t) fixed at 1 and 0, which are the ablations "CSKD without CKF" and "global
target only".
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "x2", "cos", "dense", "global")
PROGRESS_UNITS = ("epoch", "step")


def local_weight(progress: float | torch.Tensor, schedule: str = "linear") -> float | torch.Tensor:
    """Return a(t), the weight of the local (dense) teacher response at progress t in [0, 1].

    ``linear``: 1 - t (the paper's default); ``x2``: (1 - t)^2; ``cos``: cos(pi t / 2);
    ``dense``: 1 (no CKF); ``global``: 0. A 0-d tensor t (a training task's progress, which
    ``torch.compile`` must not turn into a constant) gives a tensor, unchecked.
    """
    tensor = isinstance(progress, torch.Tensor)
    if not tensor and not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must lie in [0, 1], got {progress}")
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "x2":
        return (1.0 - progress) ** 2
    if schedule == "cos":
        cos = torch.cos if tensor else math.cos
        return cos(math.pi * progress / 2.0)
    if schedule == "dense":
        return 1.0
    if schedule == "global":
        return 0.0
    raise ValueError(f"unknown CKF schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")


def training_progress(
    *, epoch: int, step_in_epoch: int, steps_per_epoch: int, epochs: int, unit: str = "epoch"
) -> float:
    """Training progress t in [0, 1].

    ``epoch`` (as released): t = epoch / epochs, epoch counted from 0, constant within an epoch.
    ``step``: t = (epoch * steps_per_epoch + step_in_epoch) / (epochs * steps_per_epoch).
    Tensor ``epoch`` / ``step_in_epoch`` (a training task's count) give a 0-d tensor.
    """
    if unit == "epoch":
        return _at_most_one(epoch / epochs)
    if unit == "step":
        return _at_most_one((epoch * steps_per_epoch + step_in_epoch) / (epochs * steps_per_epoch))
    raise ValueError(f"unknown progress unit {unit!r}: choose one of {', '.join(PROGRESS_UNITS)}")


def _at_most_one(value: float | torch.Tensor) -> float | torch.Tensor:
    return value.clamp(max=1.0) if isinstance(value, torch.Tensor) else min(value, 1.0)
