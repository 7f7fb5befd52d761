"""``CSKDTask``: CSKD inside the user's own training loop, as a timm training task.

timm's task API (``timm.task``) lets a loop stay the same whatever the objective:
``task(input, target)`` returns a dict with ``loss`` and ``output``, and the task owns the EMA,
DDP of the trainable part, ``torch.compile`` and its checkpoint state. :class:`CSKDTask` is that
for CSKD (and DeiT distillation, or no teacher): the teacher sees the batch the student sees
(after the loop's Mixup/CutMix) in its own normalisation, the student's patch tokens are pooled
to the teacher's grid, and the training progress t that CKF's a(t) needs is counted by the task
itself, so a loop passes nothing but the batch.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from timm.task import TrainingTask
from timm.utils import unwrap_model
from torch import nn

from ..errors import ConfigError
from ..method.adapters import (
    DenseStudent,
    DenseTeacher,
    DistilledStudent,
    MapStudent,
    PlainClassifier,
    is_vit,
    map_student_problem,
    patch_logits_problem,
    state_dict_of_child,
    wrap_student,
)
from ..method.distiller import distill
from ..method.losses import ObjectiveWeights
from ..method.schedules import PROGRESS_UNITS, training_progress
from .models import load_teacher
from .preflight import check_student_grid, no_classifier


class CSKDTask(TrainingTask):
    """A timm :class:`~timm.task.TrainingTask` for CSKD (paper Sec. 3), DeiT distillation or none.

    ``task(input, target)`` -> ``{"loss", "output", "base", "token", "cskd", "local_weight"}``:
    ``input`` (N, C, S, S) normalised for the student (``student_mean`` / ``student_std``, by
    default the student's timm ``pretrained_cfg``), after the loop's Mixup/CutMix; ``target``
    (N,) labels or (N, K) soft targets. ``loss`` is the objective to backpropagate, ``output``
    the class head's logits (N, K) (for the loop's accuracy), the other entries its detached
    parts (``token`` without a teacher and ``cskd``, ``local_weight`` only under ``cskd``).

    The progress t of a(t) comes from the task's own count of training calls (``task.train()``
    mode; ``grad_accum_steps`` calls make one optimiser step): ``progress="epoch"`` holds t at
    ``epoch / epochs`` through an epoch, as the release does; ``"step"`` moves it every step.
    The count is the task's checkpoint state (:meth:`get_task_state`), so a resumed loop
    continues the schedule; :meth:`set_position` sets it directly.

    ``student_model``: a timm model (a ViT becomes a :class:`DenseStudent`; under ``cskd`` a
    hierarchical or convolutional model a :class:`MapStudent`, otherwise a
    :class:`PlainClassifier`) or an adapter already.
    ``teacher_model``: a :class:`DenseTeacher`, a timm model (wrapped, with its
    ``pretrained_cfg``'s mean/std unless ``teacher_mean`` / ``teacher_std``), or a timm name whose
    weights come from ``teacher_checkpoint`` (:func:`~cskd.load_teacher`: a file or a cskd run;
    ``teacher_kwargs`` for ``timm.create_model``).
    ``weights``: the objective (:class:`ObjectiveWeights`; the release's values by default).
    ``epochs`` and ``steps_per_epoch``: the schedule's length in optimiser steps.

    Raises :class:`~cskd.errors.ConfigError` for a student that cannot give patch logits under
    ``cskd`` (naming why), a model without a classifier head (an encoder), a teacher of other
    classes and an unknown ``progress``; :class:`~cskd.errors.TeacherError` for a teacher whose
    head is not affine after global pooling under ``cskd``; :class:`~cskd.errors.GridError`
    under ``cskd`` for a student grid coarser than the teacher's map.
    """

    def __init__(
        self,
        student_model: nn.Module,
        teacher_model: str | nn.Module | DenseTeacher | None,
        *,
        epochs: int,
        steps_per_epoch: int,
        weights: ObjectiveWeights | None = None,
        progress: str = "epoch",
        grad_accum_steps: int = 1,
        teacher_checkpoint: str | os.PathLike | None = None,
        teacher_kwargs: dict | None = None,
        teacher_mean: tuple[float, ...] | None = None,
        teacher_std: tuple[float, ...] | None = None,
        student_mean: tuple[float, ...] | None = None,
        student_std: tuple[float, ...] | None = None,
        image_size: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        self.weights = weights or ObjectiveWeights()
        if progress not in PROGRESS_UNITS:
            raise ConfigError(f"progress={progress!r}: choose one of {', '.join(PROGRESS_UNITS)}")
        if min(epochs, steps_per_epoch, grad_accum_steps) < 1:
            raise ConfigError("epochs, steps_per_epoch and grad_accum_steps must be at least 1")
        self.epochs, self.steps_per_epoch, self.unit = epochs, steps_per_epoch, progress
        self.grad_accum_steps = grad_accum_steps
        # training calls so far, from which t counts optimiser steps: a tensor, so that a compiled
        # task reads it as data and does not compile again at every step
        self.register_buffer("calls", torch.zeros((), dtype=torch.long), persistent=False)
        model = getattr(student_model, "model", student_model)  # the timm model
        config = getattr(model, "pretrained_cfg", None) or {}
        image_size = image_size or _image_size(model, config)
        mean = student_mean or tuple(config.get("mean", (0.485, 0.456, 0.406)))
        std = student_std or tuple(config.get("std", (0.229, 0.224, 0.225)))
        shape = (1, len(mean), 1, 1)
        self.register_buffer("student_mean", torch.tensor(mean).view(shape), persistent=False)
        self.register_buffer("student_std", torch.tensor(std).view(shape), persistent=False)
        student = self._student(student_model, image_size, in_chans=len(mean))
        self.trainable_module = student
        self.teacher = self._teacher(
            teacher_model,
            checkpoint=teacher_checkpoint,
            num_classes=model.num_classes,
            in_chans=len(mean),
            image_size=image_size,
            mean=teacher_mean,
            std=teacher_std,
            kwargs=teacher_kwargs or {},
        )
        if self.weights.method == "cskd" and isinstance(student, DistilledStudent):
            check_student_grid(student, self.teacher, image_size, type(model).__name__)
        self.to(self.device)

    def _student(
        self, model: nn.Module, image_size: int, *, in_chans: int
    ) -> DenseStudent | MapStudent | PlainClassifier:
        adapters = DenseStudent | MapStudent | PlainClassifier
        method = self.weights.method
        student = model if isinstance(model, adapters) else wrap_student(model, method=method)
        inner = student.model
        problem = None
        if no_classifier(inner):
            problem = "it has no classifier head (timm num_classes=0: an encoder)"
            raise ConfigError(f"{type(inner).__name__} cannot be a student: {problem}")
        if method == "cskd" and isinstance(student, PlainClassifier):
            problem = patch_logits_problem(inner) if is_vit(inner) else "it gives no dense logits"
        elif method == "cskd" and isinstance(student, MapStudent):
            problem = map_student_problem(inner, image_size, in_chans)
        if problem is not None:
            raise ConfigError(
                f"{type(inner).__name__} cannot be a CSKD student: {problem}; distil it with "
                'ObjectiveWeights(method="deit") instead'
            )
        return student

    def _teacher(
        self, teacher, *, checkpoint, num_classes, in_chans, image_size, mean, std, kwargs
    ):
        if self.weights.method == "none":
            return None
        global_only = self.weights.method == "deit"
        inner = teacher.model if isinstance(teacher, DenseTeacher) else teacher
        if isinstance(inner, nn.Module):
            if no_classifier(inner):
                raise ConfigError(
                    f"the teacher {type(inner).__name__} has no classifier head (timm "
                    f"num_classes=0: an encoder): build it with num_classes={num_classes}, the "
                    "student's classes, and give it weights trained on them"
                )
            classes = getattr(inner, "num_classes", None)
            if classes is not None and classes != num_classes:
                raise ConfigError(
                    f"the teacher {type(inner).__name__} gives {classes} classes and the student "
                    f"{num_classes}: a teacher must be trained on the student's classes"
                )
        if isinstance(teacher, DenseTeacher):
            if teacher.global_only and not global_only:
                raise ConfigError(
                    f"the teacher {type(inner).__name__} was wrapped with global_only=True, so it "
                    "gives no dense logits for CSKD: wrap it with global_only=False, or distil "
                    'with ObjectiveWeights(method="deit")'
                )
            return teacher
        if isinstance(teacher, str):
            return load_teacher(
                teacher,
                checkpoint,
                num_classes=num_classes,
                global_only=global_only,
                image_size=image_size,
                mean=mean,
                std=std,
                **{"in_chans": in_chans, **kwargs},
            )
        if isinstance(teacher, nn.Module):
            return DenseTeacher(
                teacher, check_size=image_size, global_only=global_only, mean=mean, std=std
            )
        raise ConfigError(
            f"method {self.weights.method} needs a teacher: a timm name, a model or a DenseTeacher"
        )

    @property
    def progress(self) -> torch.Tensor:
        """The training progress t in [0, 1] of the next training call (a 0-d tensor)."""
        step = torch.div(self.calls, self.grad_accum_steps, rounding_mode="floor")
        return training_progress(
            epoch=step // self.steps_per_epoch,
            step_in_epoch=step % self.steps_per_epoch,
            steps_per_epoch=self.steps_per_epoch,
            epochs=self.epochs,
            unit=self.unit,
        )

    def set_position(self, epoch: int, step_in_epoch: int = 0) -> None:
        """Place the schedule at ``epoch`` (from 0) and ``step_in_epoch`` optimiser steps into it."""
        step = epoch * self.steps_per_epoch + step_in_epoch
        self.calls.fill_(step * self.grad_accum_steps)

    def train(self, mode: bool = True) -> CSKDTask:
        """Train or eval mode for the student; the teacher stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """One batch: see the class docstring for what goes in and comes out."""
        loss, parts, output = distill(
            self.trainable_module,
            self.teacher,
            self.weights,
            input,
            target,
            self.progress,
            student_mean=self.student_mean,
            student_std=self.student_std,
        )
        if self.training:
            self.calls.add_(1)
        result = {"loss": loss, "output": output.cls_logits}
        for name, value in parts.items():
            if name != "loss":
                result[name] = torch.as_tensor(value, device=loss.device)
        return result

    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs) -> CSKDTask:
        """Wrap the student in DistributedDataParallel; the frozen teacher stays unwrapped."""
        from torch.nn.parallel import DistributedDataParallel

        self.trainable_module = DistributedDataParallel(
            self.trainable_module, device_ids=device_ids, **ddp_kwargs
        )
        return self

    def compile(self, backend: str = "inductor", mode: str | None = None, **kwargs) -> nn.Module:
        """Compile the student and the teacher (once each, before DDP); returns the eval model."""
        self.trainable_module.compile(backend=backend, mode=mode, **kwargs)
        if self.teacher is not None:
            self.teacher.compile(backend=backend, mode=mode, **kwargs)
        return self.get_eval_model()

    def get_eval_model(self, module: nn.Module | None = None, ema: bool = False) -> nn.Module:
        """The student as a classifier for validation: ``model(images)`` -> (N, K) logits under
        its inference rule (:class:`Predictor`); its state dict is the timm model's."""
        module = module if module is not None else self.get_trainable_module(ema=ema)
        if module is None:
            return None
        module = getattr(module, "module", module)  # timm's ModelEmaV3 and DDP keep it there
        return Predictor(unwrap_model(module))

    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict:
        """The training calls counted so far (the CKF schedule's position)."""
        return {"calls": int(self.calls), "grad_accum_steps": self.grad_accum_steps}

    def load_task_state(
        self, state: dict[str, Any] | None, strict: bool = True, module=None, ema: bool = False
    ) -> None:
        """Continue the CKF schedule where the saved task left it (in optimiser steps)."""
        if not state:
            if strict:
                raise ConfigError("the checkpoint holds no CSKD task state (the schedule position)")
            return
        steps = state["calls"] // state.get("grad_accum_steps", 1)
        self.calls.fill_(steps * self.grad_accum_steps)


class Predictor(nn.Module):
    """A student's inference: ``forward(images)`` -> (N, K) logits under its inference rule
    (:func:`~cskd.combine_heads`), for evaluators that expect a plain classifier. Its state dict
    is the wrapped student's (the timm model's keys)."""

    def __init__(self, student: DenseStudent | MapStudent | PlainClassifier) -> None:
        super().__init__()
        self.student = student
        state_dict_of_child(self, "student")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if isinstance(self.student, DistilledStudent):
            return self.student.inference_logits(images)
        return self.student(images).cls_logits


def _image_size(model: nn.Module, config: dict) -> int:
    """The student's input side in pixels: its patch embedding's, else its pretrained_cfg's."""
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if built is not None:
        return int(built[0])
    return int(config.get("input_size", (3, 224, 224))[-1])
