"""Spatial alignment of the student's patch grid to the teacher's feature grid.

The student's tokens (or logits) live on an h x w grid, the teacher's dense logits on H x W. CSKD
compares them location by location, so the student side is pooled down to H x W:

- h, w integer multiples of H, W (14 x 14 -> 7 x 7): exact average pooling over (h/H) x (w/W)
  blocks;
- equal grids: identity;
- otherwise (12 x 12 -> 5 x 5): area-weighted pooling, each teacher cell averaging the student
  cells it overlaps, weighted by the overlap area.

A student grid smaller than the teacher's in either direction cannot be pooled and is refused.
Pooling is linear, so it commutes with the linear distillation head: pooling tokens first gives
the same logits for less work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import GridError


def check_grids(
    student_grid: tuple[int, int], teacher_grid: tuple[int, int], *, student_map: str = ""
) -> None:
    """Raise :class:`GridError` when ``student_grid`` cannot be pooled onto ``teacher_grid``.
    ``student_map``: for a student whose dense logits come from its final feature map (a
    hierarchical or convolutional model), what that map is (e.g. ``"resnet18's final feature
    map at 32 px"``); the message then names its output stride, not patches."""
    (h, w), (th, tw) = student_grid, teacher_grid
    if h >= th and w >= tw:
        return
    if student_map:
        raise GridError(
            f"student map {h}x{w} ({student_map}) is smaller than the teacher grid {th}x{tw}: "
            "raise the image size, give the student a finer map (its output_stride where the "
            "model takes one: student.kwargs.output_stride in a run) or the teacher a coarser one"
        )
    raise GridError(
        f"student grid {h}x{w} is smaller than the teacher grid {th}x{tw}: raise the student's "
        "image size or lower its patch size so that it has at least as many patches per side"
    )


def _area_weights(source: int, target: int, *, dtype: torch.dtype) -> torch.Tensor:
    """(target, source) matrix whose row i averages the source cells overlapping target cell i."""
    edges_t = torch.arange(target + 1, dtype=torch.float64) * (source / target)
    lo = torch.arange(source, dtype=torch.float64)
    overlap = (
        torch.minimum(edges_t[1:, None], lo[None, :] + 1) - torch.maximum(edges_t[:-1, None], lo)
    ).clamp(min=0)
    return (overlap / overlap.sum(dim=1, keepdim=True)).to(dtype)


def align_to_grid(
    values: torch.Tensor,
    student_grid: tuple[int, int],
    teacher_grid: tuple[int, int],
    *,
    student_map: str = "",
) -> torch.Tensor:
    """Pool per-patch values (N, h*w, C), row-major on ``student_grid``, to (N, H*W, C).

    C may be the token width D (pool before the head) or the number of classes K. Raises
    :class:`GridError` (:func:`check_grids`, with ``student_map``) for a coarser student grid.
    """
    check_grids(student_grid, teacher_grid, student_map=student_map)
    (h, w), (th, tw) = student_grid, teacher_grid
    n, m, c = values.shape
    if m != h * w:
        raise GridError(f"{m} patch values do not fill the student grid {h}x{w}")
    if (h, w) == (th, tw):
        return values
    if h % th == 0 and w % tw == 0:
        grid = values.transpose(1, 2).reshape(n, c, h, w)  # (N, C, h, w)
        pooled = F.avg_pool2d(grid, kernel_size=(h // th, w // tw))  # (N, C, H, W)
        return pooled.flatten(2).transpose(1, 2)  # (N, H*W, C)
    rows = _area_weights(h, th, dtype=values.dtype).to(values.device)  # (H, h)
    cols = _area_weights(w, tw, dtype=values.dtype).to(values.device)  # (W, w)
    grid = values.reshape(n, h, w, c)
    pooled = torch.einsum("ih,jw,nhwc->nijc", rows, cols, grid)  # (N, H, W, C)
    return pooled.reshape(n, th * tw, c)
