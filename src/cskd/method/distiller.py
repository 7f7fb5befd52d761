"""``Distiller``: the student, the frozen teacher and the objective in one module. The teacher
sees exactly the (augmented, erased, mixed) batch the student sees, renormalised to its own
mean and std.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import DenseTeacher, TeacherOutput
from .losses import ObjectiveWeights, objective


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
    ) -> None:
        """``student_norm``: the (mean, std) the images are normalised with, each (1, C, 1, 1);
        the teacher renormalises them to its own (:meth:`DenseTeacher.renormalize`)."""
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.weights = weights
        self.register_buffer("student_mean", student_norm[0], persistent=False)
        self.register_buffer("student_std", student_norm[1], persistent=False)

    def forward(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        progress: float,
        teacher_output: TeacherOutput | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """images: (N, C, S, S) normalised for the student; targets: (N,) or (N, K) soft.
        ``teacher_output``: the teacher's responses for this batch when they come from a cache
        (:class:`~cskd.teacher.cached.CachedTeacher`); the teacher then does not run."""
        if self.weights.method == "none":
            output = self.student(images, with_patches=False)
            return objective(cls_logits=output.cls_logits, targets=targets, weights=self.weights)
        teacher = teacher_output
        if teacher is None:
            pixels = self.teacher.renormalize(images, mean=self.student_mean, std=self.student_std)
            teacher = self.teacher(pixels)
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
