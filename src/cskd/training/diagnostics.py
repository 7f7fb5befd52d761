"""Diagnostics that explain a CSKD result: how good the teacher's dense map is, how closely the
student's patch predictions follow the CKF target, and how far each layer of the student looks.

- :func:`teacher_map_quality`: per-location accuracy of the teacher's dense map against the
  label, agreement with its own global answer, entropy; split into object and background cells
  when an object mask is known (translated Fashion-MNIST).
- :func:`student_agreement`: the fraction of teacher-grid locations where the student's patch
  prediction (its distillation head on the pooled patch tokens, as the CSKD loss sees it) equals
  the hard CKF target at a given a(t), and the local (a = 1) and global (a = 0) targets.
- :func:`attention_distance`: per block, the mean distance in pixels between a query patch and
  the patches it attends to, weighted by attention (the ViT paper's "mean attention distance";
  the CSKD paper's analysis: CNN supervision makes early training attend locally).
- :func:`measure`: all of them on one batch, as ``train.diagnostics`` logs them every evaluated
  epoch; :func:`write_report` draws a run's pictures for ``cskd diagnose``.
"""

from __future__ import annotations

import math
import random
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..method.adapters import DenseStudent, DenseTeacher, DistilledStudent
from ..method.losses import fused_target
from ..method.schedules import local_weight


def _entropy(logits: torch.Tensor, dim: int) -> torch.Tensor:
    return -(logits.softmax(dim) * logits.log_softmax(dim)).sum(dim)


def object_cells(
    object_mask: torch.Tensor, grid: Sequence[int], *, cover: float = 0.3
) -> torch.Tensor:
    """Pixel mask (N, S, S) -> cell mask (N, H, W): cells at least ``cover`` object pixels."""
    fraction = F.adaptive_avg_pool2d(object_mask.float()[:, None], tuple(grid))[:, 0]
    return fraction >= cover


def teacher_map_quality(
    dense_logits: torch.Tensor,
    global_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    object_mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """Quality of the teacher's dense map, in percent (entropies in nats).

    dense_logits (N, K, H, W), global_logits (N, K), targets (N,) class indices; object_mask
    (N, H, W) bool marks the cells holding the object. Returns ``local_top1`` (locations whose
    argmax is the label), ``global_top1``, ``local_agrees_with_global``, ``local_entropy``,
    ``global_entropy``, and with a mask the first three again as ``object_*`` and
    ``background_*`` (means over the cells of each kind).
    """
    dense, global_logits = dense_logits.float(), global_logits.float()
    local_class = dense.argmax(1)  # (N, H, W)
    global_class = global_logits.argmax(1)  # (N,)
    correct = local_class == targets[:, None, None]
    agrees = local_class == global_class[:, None, None]
    result = {
        "local_top1": 100.0 * correct.float().mean().item(),
        "global_top1": 100.0 * (global_class == targets).float().mean().item(),
        "local_agrees_with_global": 100.0 * agrees.float().mean().item(),
        "local_entropy": _entropy(dense, 1).mean().item(),
        "global_entropy": _entropy(global_logits, 1).mean().item(),
    }
    if object_mask is not None:
        for name, cells in (("object", object_mask), ("background", ~object_mask)):
            count = max(int(cells.sum()), 1)
            result[f"{name}_local_top1"] = 100.0 * int((correct & cells).sum()) / count
            result[f"{name}_agrees_with_global"] = 100.0 * int((agrees & cells).sum()) / count
            result[f"{name}_cells"] = 100.0 * int(cells.sum()) / cells.numel()
    return result


def student_agreement(
    student_patch_logits: torch.Tensor,
    dense_logits: torch.Tensor,
    global_logits: torch.Tensor,
    *,
    weight: float,
) -> dict[str, float]:
    """Percent of locations where the student's patch prediction equals a teacher target.

    student_patch_logits (N, H*W, K) on the teacher's grid (row-major); dense_logits
    (N, K, H, W); global_logits (N, K); ``weight`` is a(t). Keys: ``follows_ckf_target`` (the
    hard CKF target at a(t), what the loss trains towards), ``follows_local`` (a = 1) and
    ``follows_global`` (a = 0).
    """
    prediction = student_patch_logits.float().argmax(-1)  # (N, H*W)

    def agreement(a: float) -> float:
        target = fused_target(dense_logits.float(), global_logits.float(), a).argmax(1)
        return 100.0 * (prediction == target.flatten(1)).float().mean().item()

    return {
        "follows_ckf_target": agreement(weight),
        "follows_local": agreement(1.0),
        "follows_global": agreement(0.0),
    }


@torch.no_grad()
def attention_distance(student: DenseStudent, images: torch.Tensor) -> list[float]:
    """Mean attention distance (pixels) of each block of a timm ViT, over heads, patch queries
    and images: sum over patch keys of attention x distance between query and key patch
    centres. Attention to prefix tokens (class, distillation, registers) is left out and the
    rest renormalised. images (N, C, S, S) normalised for the student.

    Reads the attention probabilities at each block's ``attn.attn_drop`` (timm's unfused path,
    switched on for this call only). Raises TypeError for a model without that structure.
    """
    model = student.model
    blocks = list(getattr(model, "blocks", []))
    if not blocks or not all(hasattr(b, "attn") and hasattr(b.attn, "attn_drop") for b in blocks):
        raise TypeError(
            f"{type(model).__name__}: attention distance needs timm ViT blocks with attn.attn_drop"
        )
    grid = student._grid_for(images)
    patch = images.shape[-1] / grid[1], images.shape[-2] / grid[0]
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([rows.flatten() * patch[1], cols.flatten() * patch[0]], 1).float()
    distances = torch.cdist(centres, centres).to(images.device)  # (M, M) pixels
    prefix = model.num_prefix_tokens
    captured: list[torch.Tensor] = []
    hooks, fused = [], []
    for block in blocks:
        fused.append(getattr(block.attn, "fused_attn", False))
        block.attn.fused_attn = False
        hooks.append(
            block.attn.attn_drop.register_forward_hook(
                lambda _m, inputs, _o: captured.append(inputs[0].detach())
            )
        )
    was_training = student.training
    student.eval()
    try:
        model.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
        for block, value in zip(blocks, fused, strict=True):
            block.attn.fused_attn = value
        student.train(was_training)
    result = []
    for attention in captured:  # (N, heads, T, T)
        patches = attention[:, :, prefix:, prefix:].float()  # (N, heads, M, M)
        patches = patches / patches.sum(-1, keepdim=True).clamp_min(1e-12)
        result.append((patches * distances).sum(-1).mean().item())
    return result


def cutmix_answers(
    answers: torch.Tensor, partner: torch.Tensor, targets: torch.Tensor
) -> dict[str, dict[str, float]]:
    """Whose label each cell answers under CutMix, in percent of the cells of each kind.

    answers (N, H, W) class indices on a grid (a teacher's cell argmax, a student's patch
    predictions); partner (N, S, S) the pasted image's share of each pixel (image i's paste comes
    from image N - 1 - i, timm's pairing); targets (N,). Cells at least half pasted are ``inside``
    the box, the rest ``outside``; for each kind: ``pasted`` (the answer is the pasted image's
    label), ``base`` (the base image's), ``neither``. Pairs with the same label are left out
    (their cells cannot tell the two apart)."""
    grid = tuple(answers.shape[-2:])
    share = F.adaptive_avg_pool2d(partner.float()[:, None], grid)[:, 0]  # (N, H, W)
    base, pasted = targets[:, None, None], targets.flip(0)[:, None, None]
    usable = (base != pasted).expand_as(answers)
    result = {}
    for kind, cells in (("inside", share >= 0.5), ("outside", share < 0.5)):
        cells = cells & usable
        count = max(int(cells.sum()), 1)
        is_pasted, is_base = (answers == pasted) & cells, (answers == base) & cells
        result[kind] = {
            "pasted": 100.0 * int(is_pasted.sum()) / count,
            "base": 100.0 * int(is_base.sum()) / count,
            "neither": 100.0
            * int((cells & ~(answers == pasted) & ~(answers == base)).sum())
            / count,
            "cells": int(cells.sum()),
        }
    return result


def cutmix_probe(
    student: nn.Module,
    teacher: DenseTeacher,
    pixels: torch.Tensor,
    targets: torch.Tensor,
    *,
    student_norm: tuple[torch.Tensor, torch.Tensor],
) -> dict:
    """The mechanism under CutMix (issue 19): on the probe images pasted into each other with
    timm's CutMix (a fixed box per pair, drawn from a fixed seed that leaves the run's random
    state untouched), whose label the teacher's cells, the student's patch predictions and
    DeiT's single token target answer. The teacher sees the mixed batch in its own
    normalisation, as in training. pixels (N, C, S, S) in [0, 1] with N even, targets (N,).
    Returns ``{"teacher": cutmix_answers, "student": ... (a ViT), "token_target": {"pasted",
    "base", "neither"}}``."""
    from timm.data import Mixup

    from ..teacher.cached import mix_with_partner_weights

    count = pixels.shape[0] - pixels.shape[0] % 2
    pixels, targets = pixels[:count], targets[:count]
    mean, std = student_norm
    images = (pixels - mean) / std
    numpy_state, python_state = np.random.get_state(), random.getstate()
    np.random.seed(0)
    random.seed(0)
    try:
        cutmix = Mixup(
            cutmix_alpha=1.0, mixup_alpha=0.0, mode="elem", num_classes=1 + int(targets.max())
        )
        mixed, _, partner = mix_with_partner_weights(cutmix, images.clone(), targets)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    output = teacher(teacher.renormalize(mixed, mean=mean, std=std))
    dense, global_logits = output.dense_logits.float(), output.global_logits.float()
    result = {"teacher": cutmix_answers(dense.argmax(1), partner, targets)}
    if isinstance(student, DistilledStudent):
        was_training = student.training
        student.eval()
        grid = tuple(dense.shape[-2:])
        patches = student(mixed, output_grid=grid).patch_logits.argmax(-1).view(-1, *grid)
        student.train(was_training)
        result["student"] = cutmix_answers(patches, partner, targets)
    token = global_logits.argmax(1)  # DeiT's hard token target for the whole mixed image
    usable = targets != targets.flip(0)
    count = max(int(usable.sum()), 1)
    result["token_target"] = {
        "pasted": 100.0 * int(((token == targets.flip(0)) & usable).sum()) / count,
        "base": 100.0 * int(((token == targets) & usable).sum()) / count,
        "neither": 100.0
        * int((usable & (token != targets) & (token != targets.flip(0))).sum())
        / count,
    }
    return result


@torch.no_grad()
def measure(
    student: nn.Module,
    teacher: DenseTeacher | None,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    progress: float,
    schedule: str,
    teacher_images: torch.Tensor | None = None,
    object_mask: torch.Tensor | None = None,
    cutmix: dict | None = None,
) -> dict:
    """Every diagnostic on one batch: ``attention_distance`` (a list per block, for a ViT),
    ``teacher`` (:func:`teacher_map_quality`) and ``student`` (:func:`student_agreement` at
    a(progress)) when there is a teacher. images (N, C, S, S) normalised for the student,
    teacher_images the same pixels in the teacher's normalisation; object_mask (N, S, S)
    pixel mask of the object, if known."""
    result: dict = {"progress": progress, "local_weight": local_weight(progress, schedule)}
    if isinstance(student, DenseStudent):
        result["attention_distance"] = attention_distance(student, images)
    if teacher is None:
        return result
    output = teacher(images if teacher_images is None else teacher_images)
    if output.dense_logits is None:  # a global-only teacher (DeiT distillation from a ViT)
        return result
    dense, global_logits = output.dense_logits.float(), output.global_logits.float()
    grid = tuple(dense.shape[-2:])
    cells = object_cells(object_mask, grid) if object_mask is not None else None
    result["teacher"] = teacher_map_quality(dense, global_logits, targets, object_mask=cells)
    if isinstance(student, DistilledStudent):
        was_training = student.training
        student.eval()
        patch_logits = student(images, output_grid=grid).patch_logits  # (N, H*W, K)
        student.train(was_training)
        result["student"] = student_agreement(
            patch_logits, dense, global_logits, weight=result["local_weight"]
        )
    if cutmix is not None:
        result["cutmix"] = cutmix_probe(student, teacher, targets=targets, **cutmix)
    return result


@torch.no_grad()
def draw_maps(
    path: Path,
    *,
    student: DenseStudent,
    teacher: DenseTeacher,
    images: torch.Tensor,
    teacher_images: torch.Tensor,
    pixels: torch.Tensor,
    targets: torch.Tensor,
    schedule: str,
    class_names: Sequence[str] | None = None,
) -> None:
    """A PNG with one row per image: the image, the teacher's dense argmax map, the student's
    patch predictions on the teacher's grid, and the CKF target at progress 0, 0.5 and 0.9.
    Cells show the class index; green cells equal the label, red ones do not; a legend under
    the figure says so and names the classes. pixels (N, C, S, S) in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    output = teacher(teacher_images)
    dense, global_logits = output.dense_logits.float(), output.global_logits.float()
    grid = tuple(dense.shape[-2:])
    was_training = student.training
    student.eval()
    student_map = student(images, output_grid=grid).patch_logits.argmax(-1).view(-1, *grid)
    student.train(was_training)
    progresses = (0.0, 0.5, 0.9)
    columns = [("teacher P_local", dense.argmax(1)), ("student patches", student_map)]
    for t in progresses:
        a = local_weight(t, schedule)
        target = fused_target(dense, global_logits, a).argmax(1)
        columns.append((f"CKF target t={t} (a={a:.2f})", target))
    count = images.shape[0]
    figure, axes = pyplot.subplots(
        count, len(columns) + 1, figsize=(2.0 * (len(columns) + 1), 2.1 * count), squeeze=False
    )
    for row in range(count):
        picture = pixels[row].permute(1, 2, 0).cpu().numpy()
        label = int(targets[row])
        name = class_names[label] if class_names else str(label)
        axes[row][0].imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray")
        axes[row][0].set_title(f"label {label}: {name}", fontsize=7)
        for column, (title, maps) in enumerate(columns, start=1):
            cells = maps[row].cpu()
            correct = (cells == label).float().numpy()
            axes[row][column].imshow(correct, cmap="RdYlGn", vmin=0, vmax=1)
            for (i, j), value in _cells(cells):
                axes[row][column].text(j, i, str(value), ha="center", va="center", fontsize=6)
            if row == 0:
                axes[row][column].set_title(title, fontsize=7)
    for axis in figure.axes:
        axis.set_xticks([])
        axis.set_yticks([])
    legend = "Each cell: the class predicted there (its index). Green: equals the label; red: not."
    if class_names:
        names = ", ".join(f"{index} {name}" for index, name in enumerate(class_names))
        legend += "\nClasses: " + "\n".join(
            textwrap.wrap(names, width=28 * (len(columns) + 1) // 2)
        )
    figure.text(0.01, 0.0, legend, fontsize=7, va="bottom", ha="left")
    lines = legend.count("\n") + 1
    figure.tight_layout(rect=(0, 0.12 * lines / count, 1, 1))
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def _cells(cells: torch.Tensor):
    for i in range(cells.shape[0]):
        for j in range(cells.shape[1]):
            yield (i, j), int(cells[i, j])


def plot_cutmix(path: Path, cutmix: dict, *, title: str) -> None:
    """A PNG of :func:`cutmix_probe`: for the teacher's cells and the student's patches inside and
    outside the pasted box, and for DeiT's token target, the share answering the pasted image's
    label, the base image's, or neither (stacked bars, percent)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    bars = [
        (f"{who}\n{kind}", cutmix[who][kind])
        for who in ("teacher", "student")
        if who in cutmix
        for kind in ("inside", "outside")
    ]
    bars.append(("DeiT token\ntarget", cutmix["token_target"]))
    figure, axis = pyplot.subplots(figsize=(1.3 * len(bars) + 1.5, 3.4))
    bottom = [0.0] * len(bars)
    for answer, colour in (("pasted", "tab:orange"), ("base", "tab:blue"), ("neither", "tab:gray")):
        heights = [values[answer] for _, values in bars]
        axis.bar([label for label, _ in bars], heights, bottom=bottom, color=colour, label=answer)
        bottom = [b + h for b, h in zip(bottom, heights)]
    axis.set_ylabel("answers (%)")
    axis.set_title(title, fontsize=8)
    axis.legend(
        fontsize=7,
        title="label answered",
        title_fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1, 1),
    )
    axis.tick_params(axis="x", labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def plot_over_training(path: Path, records: list[dict], *, title: str) -> None:
    """A PNG of the per-epoch diagnostics of ``metrics.jsonl`` epoch records: the student's
    agreement with the CKF, local and global targets, and the attention distance per block."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    points = [(r["epoch"] + 1, r["diagnostics"]) for r in records if "diagnostics" in r]
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(9, 3.6))
    epochs = [epoch for epoch, _ in points]
    for key in ("follows_ckf_target", "follows_local", "follows_global"):
        values = [d.get("student", {}).get(key, math.nan) for _, d in points]
        if not all(math.isnan(v) for v in values):
            left.plot(epochs, values, marker="o", label=key)
    left.set_xlabel("epoch")
    left.set_ylabel("student patch = target (%)")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    depth = max((len(d.get("attention_distance", [])) for _, d in points), default=0)
    for block in range(depth):
        values = [d["attention_distance"][block] for _, d in points]
        right.plot(epochs, values, marker=".", label=f"block {block + 1}")
    right.set_xlabel("epoch")
    right.set_ylabel("mean attention distance (px)")
    right.grid(alpha=0.3)
    if depth:
        right.legend(fontsize=7)
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


class Probe:
    """A fixed batch of validation images for the diagnostics of a run, measured the same way
    at every evaluated epoch. The first ``count`` images of ``dataset`` (its evaluation
    transform), their labels, and the object's pixel mask when the dataset knows it."""

    def __init__(
        self,
        dataset,
        *,
        count: int,
        student_norm: tuple[torch.Tensor, torch.Tensor],
        schedule: str,
    ) -> None:
        from ..data import object_mask

        count = min(count, len(dataset))
        samples = [dataset[index] for index in range(count)]
        self.pixels = torch.stack([sample["image"] for sample in samples])  # (N, C, S, S)
        self.targets = torch.tensor([sample["target"] for sample in samples])
        device = student_norm[0].device
        self.images = ((self.pixels.to(device) - student_norm[0]) / student_norm[1]).contiguous()
        self.device_pixels = self.pixels.to(device)
        self.targets = self.targets.to(device)
        masks = [object_mask(dataset, index) for index in range(count)]
        self.object_mask = None
        if masks and all(mask is not None for mask in masks):
            size = tuple(self.pixels.shape[-2:])
            stacked = torch.stack(masks).float()[:, None]  # (N, 1, S_canvas, S_canvas)
            self.object_mask = F.interpolate(stacked, size=size, mode="nearest")[:, 0] > 0.5
            self.object_mask = self.object_mask.to(device)
        self.schedule = schedule
        self.student_norm = student_norm

    def measure(self, student: nn.Module, teacher: DenseTeacher | None, *, progress: float) -> dict:
        return measure(
            student,
            teacher,
            self.images,
            self.targets,
            progress=progress,
            schedule=self.schedule,
            teacher_images=teacher.normalize(self.device_pixels) if teacher is not None else None,
            object_mask=self.object_mask,
            cutmix={"pixels": self.device_pixels, "student_norm": self.student_norm},
        )
