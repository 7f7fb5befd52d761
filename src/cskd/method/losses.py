"""The CSKD objective as pure functions on tensors.

- :func:`fused_target`: Cumulative Knowledge Fusion, a(t) * P_local + (1 - a(t)) * P_global.
- :func:`cskd_loss`: the dense loss between the student's aligned patch logits and that target.
- :func:`token_loss`: DeiT's distillation-token loss against the teacher's global logits.
- :func:`base_loss`: cross-entropy with label smoothing, or with soft (Mixup/CutMix) targets.
- :func:`objective`: (1 - alpha) * base + alpha * token + weight * cskd, with the parts named.

Every reduction is stated in the docstring and tested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .align import align_to_grid
from .schedules import local_weight

METHODS = ("none", "deit", "cskd")
LOSS_KINDS = ("hard", "soft")


def fused_target(
    teacher_dense_logits: torch.Tensor,
    teacher_global_logits: torch.Tensor,
    weight: float | torch.Tensor,
) -> torch.Tensor:
    """CKF target (N, K, H, W): ``weight`` * local + (1 - ``weight``) * global, in logit space.
    ``weight``: a float, or a 0-d tensor (then no shortcut for 1.0: it would read its value)."""
    if not isinstance(weight, torch.Tensor) and weight == 1.0:
        return teacher_dense_logits
    global_map = teacher_global_logits[:, :, None, None]  # (N, K, 1, 1), broadcast over H x W
    return weight * teacher_dense_logits + (1.0 - weight) * global_map


def _student_on_teacher_grid(
    student_patch_logits: torch.Tensor,
    teacher_grid: tuple[int, int],
    student_grid: tuple[int, int] | None,
) -> torch.Tensor:
    """Student logits (N, H*W, K) on the teacher grid; pools when they are not there yet."""
    n, m, k = student_patch_logits.shape
    if m == teacher_grid[0] * teacher_grid[1] and student_grid in (None, teacher_grid):
        return student_patch_logits
    if student_grid is None:
        side = math.isqrt(m)
        if side * side != m:
            raise ValueError(
                f"{m} student patches are not on a square grid: pass student_grid=(h, w)"
            )
        student_grid = (side, side)
    return align_to_grid(student_patch_logits, student_grid, teacher_grid)


def cskd_loss(
    student_patch_logits: torch.Tensor,
    teacher_dense_logits: torch.Tensor,
    teacher_global_logits: torch.Tensor,
    progress: float,
    *,
    kind: str = "hard",
    schedule: str = "linear",
    tau: float = 1.0,
    student_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The CSKD loss between student patch logits and the CKF-fused teacher target.

    Args:
        student_patch_logits: (N, M, K), row-major on the student grid; already on the teacher's
            H x W grid (M = H * W) or pooled onto it here (square grids, or ``student_grid``).
        teacher_dense_logits: (N, K, H, W), P_local.
        teacher_global_logits: (N, K), P_global.
        progress: training progress t in [0, 1]; the weight of P_local is a(t) of ``schedule``.
        kind: ``hard``: cross-entropy to the argmax class of the fused target, **mean over the
            N x H x W locations**. ``soft``: tau^2 * KL(softmax(fused / tau) || softmax(Z / tau)),
            **summed over classes and locations and divided by N** (per image, as released).
    """
    n, k, h, w = teacher_dense_logits.shape
    weight = local_weight(progress, schedule)
    target = fused_target(teacher_dense_logits, teacher_global_logits, weight)  # (N, K, H, W)
    target = target.flatten(2).transpose(1, 2)  # (N, H*W, K)
    student = _student_on_teacher_grid(student_patch_logits, (h, w), student_grid)  # (N, H*W, K)
    if kind == "hard":
        return F.cross_entropy(student.reshape(-1, k), target.argmax(dim=-1).reshape(-1))
    if kind == "soft":
        kl = F.kl_div(
            F.log_softmax(student / tau, dim=-1),
            F.log_softmax(target / tau, dim=-1),
            reduction="sum",
            log_target=True,
        )
        return kl * (tau * tau) / n
    raise ValueError(f"unknown CSKD loss kind {kind!r}: choose one of {LOSS_KINDS}")


def token_loss(
    student_logits: torch.Tensor,
    teacher_global_logits: torch.Tensor,
    *,
    kind: str = "hard",
    tau: float = 1.0,
) -> torch.Tensor:
    """DeiT's distillation-token loss, student (N, K) against teacher P_global (N, K).

    ``hard``: cross-entropy to the teacher's argmax, **mean over N**. ``soft``:
    tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)) **summed and divided by N * K**
    (per element, as DeiT does; note this is 1/K of the per-image soft CSKD loss).
    """
    if kind == "hard":
        return F.cross_entropy(student_logits, teacher_global_logits.argmax(dim=-1))
    if kind == "soft":
        kl = F.kl_div(
            F.log_softmax(student_logits / tau, dim=-1),
            F.log_softmax(teacher_global_logits / tau, dim=-1),
            reduction="sum",
            log_target=True,
        )
        return kl * (tau * tau) / student_logits.numel()
    raise ValueError(f"unknown token loss kind {kind!r}: choose one of {LOSS_KINDS}")


def base_loss(
    logits: torch.Tensor, targets: torch.Tensor, *, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (N, K), mean over N.

    ``targets``: class indices (N,) with ``label_smoothing``, or soft targets (N, K) that already
    carry Mixup/CutMix and smoothing (then ``label_smoothing`` is not applied again).
    """
    if targets.is_floating_point():
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


@dataclass(frozen=True)
class ObjectiveWeights:
    """How the parts of the objective are weighted and computed (the released values)."""

    method: str = "cskd"  # none | deit | cskd
    alpha: float = 0.5  # weight of the token loss; the base loss gets 1 - alpha
    cskd_weight: float = 1.0
    token_kind: str = "hard"
    cskd_kind: str = "hard"
    schedule: str = "linear"
    tau: float = 1.0
    label_smoothing: float = 0.0


def objective(
    *,
    cls_logits: torch.Tensor,
    targets: torch.Tensor,
    weights: ObjectiveWeights,
    progress: float = 0.0,
    dist_logits: torch.Tensor | None = None,
    student_patch_logits: torch.Tensor | None = None,
    teacher_dense_logits: torch.Tensor | None = None,
    teacher_global_logits: torch.Tensor | None = None,
    student_grid: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """Total loss and its named parts (detached tensors, so logging need not sync every step).

    ``none``: base. ``deit``: (1 - alpha) * base + alpha * token. ``cskd``: that plus
    cskd_weight * cskd. The token loss uses ``dist_logits``, or ``cls_logits`` for a student
    without a distillation token. ``local_weight`` in the parts is a(t) for ``cskd``.
    """
    if weights.method not in METHODS:
        raise ValueError(f"unknown method {weights.method!r}: choose one of {METHODS}")
    base = base_loss(cls_logits, targets, label_smoothing=weights.label_smoothing)
    if weights.method == "none":
        return base, {"loss": base.detach(), "base": base.detach()}
    token = token_loss(
        dist_logits if dist_logits is not None else cls_logits,
        teacher_global_logits,
        kind=weights.token_kind,
        tau=weights.tau,
    )
    total = (1.0 - weights.alpha) * base + weights.alpha * token
    parts = {"base": base.detach(), "token": token.detach()}
    if weights.method == "cskd":
        dense = cskd_loss(
            student_patch_logits,
            teacher_dense_logits,
            teacher_global_logits,
            progress,
            kind=weights.cskd_kind,
            schedule=weights.schedule,
            tau=weights.tau,
            student_grid=student_grid,
        )
        total = total + weights.cskd_weight * dense
        parts["cskd"] = dense.detach()
        parts["local_weight"] = local_weight(progress, weights.schedule)
    parts["loss"] = total.detach()
    return total, parts
