"""``Distiller``: the student, the frozen teacher and the objective in one module. The teacher
sees exactly the (augmented, erased, mixed) batch the student sees, renormalised to its own
mean and std.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import DenseTeacher, StudentOutput, TeacherOutput
from .losses import ObjectiveWeights, objective


def normalizer(mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, len(mean), 1, 1)
    return (
        torch.tensor(mean, device=device).view(shape),
        torch.tensor(std, device=device).view(shape),
    )


def teacher_responses(
    teacher: DenseTeacher, images: torch.Tensor, *, mean: torch.Tensor, std: torch.Tensor
) -> TeacherOutput:
    """The frozen teacher's output for ``images`` (N, C, S, S) normalised with the student's
    ``mean`` / ``std`` (each (1, C, 1, 1)): the same pixels in the teacher's own normalisation
    (:meth:`DenseTeacher.renormalize`), as the release runs its teacher on the mixed batch."""
    return teacher(teacher.renormalize(images, mean=mean, std=std))


def distill(
    student: nn.Module,
    teacher: DenseTeacher | None,
    weights: ObjectiveWeights,
    images: torch.Tensor,
    targets: torch.Tensor,
    progress: float,
    *,
    student_mean: torch.Tensor,
    student_std: torch.Tensor,
    teacher_output: TeacherOutput | None = None,
) -> tuple[torch.Tensor, dict, StudentOutput]:
    """One batch through the teacher, the student and the objective: the loss, its named parts
    (:func:`~cskd.method.losses.objective`) and the student's output.

    ``images``: (N, C, S, S), the batch as the student sees it (augmented, erased, mixed),
    normalised with ``student_mean`` / ``student_std`` (each (1, C, 1, 1)); the teacher sees the
    same pixels in its own normalisation (:meth:`DenseTeacher.renormalize`), which is how the
    release runs its teacher on the mixed batch. ``targets``: (N,) labels or (N, K) soft targets
    (Mixup's). ``progress``: t in [0, 1] for a(t). ``teacher_output``: the teacher's responses
    when they come from a cache (:class:`~cskd.teacher.cached.CachedTeacher`); the teacher then
    does not run. Under ``cskd`` the student's patch tokens are pooled to the teacher's grid.
    """
    if weights.method == "none":
        output = student(images, with_patches=False)
        loss, parts = objective(cls_logits=output.cls_logits, targets=targets, weights=weights)
        return loss, parts, output
    if teacher_output is None:
        teacher_output = teacher_responses(teacher, images, mean=student_mean, std=student_std)
    dense = weights.method == "cskd"
    output = student(
        images,
        output_grid=tuple(teacher_output.dense_logits.shape[-2:]) if dense else None,
        with_patches=dense,
    )
    loss, parts = objective(
        cls_logits=output.cls_logits,
        dist_logits=output.dist_logits,
        student_patch_logits=output.patch_logits,
        teacher_dense_logits=teacher_output.dense_logits.float() if dense else None,
        teacher_global_logits=teacher_output.global_logits.float(),
        targets=targets,
        weights=weights,
        progress=progress,
        student_grid=output.patch_grid,
    )
    return loss, parts, output


class Distiller(nn.Module):
    """Student + frozen teacher + objective (:func:`distill`). ``student`` may be wrapped in DDP;
    the teacher is not. Its ``state_dict`` holds the student's weights only: the teacher is
    frozen and has its own file."""

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
        self._register_state_dict_hook(_without_teacher)
        self.register_load_state_dict_post_hook(_teacher_not_missing)

    def forward(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        progress: float,
        teacher_output: TeacherOutput | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """The loss and its parts for one batch: :func:`distill` without the student's output."""
        loss, parts, _ = distill(
            self.student,
            self.teacher,
            self.weights,
            images,
            targets,
            progress,
            student_mean=self.student_mean,
            student_std=self.student_std,
            teacher_output=teacher_output,
        )
        return loss, parts


def _without_teacher(module: nn.Module, state: dict, prefix: str, _metadata) -> None:
    for key in [key for key in state if key.startswith(f"{prefix}teacher.")]:
        del state[key]


def _teacher_not_missing(module: nn.Module, incompatible) -> None:
    """The teacher's weights are not in a Distiller's state dict, so they are not missing."""
    incompatible.missing_keys[:] = [
        key for key in incompatible.missing_keys if ".teacher." not in f".{key}"
    ]
