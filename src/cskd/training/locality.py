"""Is a teacher's dense map local? What each cell can see, and what it answers where it cannot
see the object.

CSKD's dense target is new information only when a cell answers for its own part of the image
(the method note's "dense teacher responses"). On translated Fashion-MNIST, where each image's
garment pixels are known, this measures it:

- :func:`receptive_field`: the window of pixels one cell of the teacher's final map depends on,
  measured from the gradient (not from the architecture's description, which a padding or a
  dilation can contradict);
- :func:`sighted_cells`: the cells whose window holds at least one pixel of the object;
- :func:`teacher_locality`: for object cells, background cells, and "blind" cells (background
  cells whose window holds no object pixel, so they cannot know its class), how often the
  cell's argmax is the object's class and the mean probability it gives that class;
- :func:`measure_locality`: all of it for a :class:`~cskd.method.adapters.DenseTeacher` on a
  diagnostics :class:`~cskd.training.diagnostics.Probe`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import TeacherError
from ..method.adapters import DenseTeacher
from .diagnostics import Probe, object_cells


@dataclass(frozen=True)
class ReceptiveField:
    """The square window of input pixels one map cell depends on. ``size``: its side (px);
    ``stride``: px per cell; ``offset``: where the window of cell (i, j) starts relative to the
    cell's own top-left pixel (i * stride, j * stride), in px (negative: above / left of it)."""

    size: int
    stride: int
    offset: int


def receptive_field(model: nn.Module, images: torch.Tensor) -> ReceptiveField:
    """Measure the receptive field of the central cell of ``model.forward_features`` (an NCHW
    map, a timm CNN): the extent of the input pixels where the gradient of that cell's summed
    features is nonzero, over every image of ``images`` (N, C, S, S), in eval mode (BatchNorm
    with its running statistics: no pixel reaches a cell through the batch). Summing over
    several images makes an accidental zero (a ReLU off for one image) unlikely. A model whose
    residual branches are zero (timm's ``zero_init_last`` at initialisation) shows only its
    shortcuts' field: measure trained weights, or build with ``zero_init_last=False``."""
    was_training = model.training
    model.eval()
    pixels = images.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            features = model.forward_features(pixels)  # (N, C_f, H, W)
            row, column = features.shape[-2] // 2, features.shape[-1] // 2
            (gradient,) = torch.autograd.grad(features[:, :, row, column].sum(), pixels)
    finally:
        model.train(was_training)
    touched = gradient.abs().sum((0, 1)) > 0  # (S, S): pixels the cell depends on
    rows = touched.any(1).nonzero().flatten()
    columns = touched.any(0).nonzero().flatten()
    if rows.numel() == 0:
        raise TeacherError(
            f"{type(model).__name__}: no pixel reaches the central cell of its map (zero "
            "residual branches? measure trained weights or build with zero_init_last=False)"
        )
    stride = images.shape[-1] // features.shape[-1]
    size = int(max(rows[-1] - rows[0], columns[-1] - columns[0])) + 1
    return ReceptiveField(size=size, stride=stride, offset=int(rows[0]) - row * stride)


def sighted_cells(
    object_mask: torch.Tensor, grid: tuple[int, int], field: ReceptiveField
) -> torch.Tensor:
    """Pixel mask (N, S, S) of the object -> (N, H, W) bool: cells whose receptive-field window
    (clipped to the image) holds at least one object pixel."""
    count, side = object_mask.shape[0], object_mask.shape[-1]
    sighted = torch.zeros(count, *grid, dtype=torch.bool, device=object_mask.device)
    for i in range(grid[0]):
        top = max(i * field.stride + field.offset, 0)
        bottom = min(i * field.stride + field.offset + field.size, side)
        for j in range(grid[1]):
            left = max(j * field.stride + field.offset, 0)
            right = min(j * field.stride + field.offset + field.size, side)
            window = object_mask[:, top:bottom, left:right]  # (N, <= size, <= size)
            sighted[:, i, j] = window.flatten(1).any(1) if window.numel() else False
    return sighted


def teacher_locality(
    dense_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    object_cells: torch.Tensor,
    sighted: torch.Tensor,
) -> dict[str, float]:
    """What the teacher's cells answer, by kind of cell, in percent.

    dense_logits (N, K, H, W), targets (N,) the object's class, object_cells (N, H, W) bool
    (the cells mostly object, :func:`~cskd.training.diagnostics.object_cells`), sighted
    (N, H, W) bool (:func:`sighted_cells`). Kinds: ``object``, ``background`` (not object) and
    ``blind`` (background and not sighted: the cell cannot see the object). Per kind:
    ``{kind}_names_label`` (cells whose argmax is the object's class), ``{kind}_label_probability``
    (mean over the cells of the softmax probability of the object's class), ``{kind}_cells``
    (the kind's share of all cells). Means are over the cells of each kind, pooled over images;
    a kind with no cell gives NaN (never 0, which would read as a perfect score).
    """
    dense = dense_logits.float()
    index = targets[:, None, None, None].expand(-1, 1, *dense.shape[-2:])  # (N, 1, H, W)
    probability = dense.softmax(1).gather(1, index)[:, 0]  # (N, H, W)
    names = dense.argmax(1) == targets[:, None, None]  # (N, H, W)
    result = {}
    kinds = {
        "object": object_cells,
        "background": ~object_cells,
        "blind": ~object_cells & ~sighted,
    }
    for kind, cells in kinds.items():
        count = int(cells.sum())
        nan = float("nan")
        result[f"{kind}_names_label"] = 100.0 * int((names & cells).sum()) / count if count else nan
        result[f"{kind}_label_probability"] = (
            100.0 * probability[cells].mean().item() if count else nan
        )
        result[f"{kind}_cells"] = 100.0 * count / cells.numel()
    return result


@torch.no_grad()
def measure_locality(teacher: DenseTeacher, probe: Probe, *, field_images: int = 32) -> dict:
    """:func:`teacher_locality` of ``teacher`` on the probe's images, with the measured
    receptive field (on the first ``field_images`` of them): ``receptive_field_px``,
    ``receptive_field_offset_px``, ``cell_px``, ``images`` and the per-kind measures. Raises
    TeacherError for a teacher without dense logits or a probe without object masks."""
    if teacher.global_only or probe.object_mask is None:
        raise TeacherError(
            f"the locality of teacher {teacher.name} needs its dense map and a dataset that "
            "knows where its object is (translated_fashion_mnist)"
        )
    images = teacher.normalize(probe.device_pixels)  # (N, C, S, S)
    dense = teacher(images).dense_logits.float()  # (N, K, H, W)
    grid = tuple(dense.shape[-2:])
    field = receptive_field(teacher.model, images[:field_images])
    measures = teacher_locality(
        dense,
        probe.targets,
        object_cells=object_cells(probe.object_mask, grid),
        sighted=sighted_cells(probe.object_mask, grid, field),
    )
    return {
        "images": int(probe.targets.shape[0]),
        "receptive_field_px": field.size,
        "receptive_field_offset_px": field.offset,
        "cell_px": field.stride,
        **measures,
    }
