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
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..method.adapters import DenseStudent, DenseTeacher
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
    if isinstance(student, DenseStudent):
        was_training = student.training
        student.eval()
        patch_logits = student(images, output_grid=grid).patch_logits  # (N, H*W, K)
        student.train(was_training)
        result["student"] = student_agreement(
            patch_logits, dense, global_logits, weight=result["local_weight"]
        )
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
        )
