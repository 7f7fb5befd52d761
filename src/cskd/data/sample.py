"""The sample every dataset returns (see :mod:`cskd.data`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from ..errors import DataError

TransformResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Transform = Callable[[Image.Image], TransformResult]


def crop_tensor(top: float, left: float, height: float, width: float) -> torch.Tensor:
    return torch.tensor([top, left, height, width], dtype=torch.float32)


def make_sample(
    image: Image.Image, target: int, index: int, transform: Transform | None
) -> dict[str, Any]:
    """Build the per-sample dict shared by all datasets (see the module docstring).

    ``transform`` maps a PIL image to ``(image tensor, crop box, flip)``; with None the whole
    image is converted to a tensor, with the full-image crop box and no flip.
    """
    if transform is None:
        tensor = TF.to_tensor(image)
        crop = crop_tensor(0, 0, image.height, image.width)
        flip = torch.tensor(False)
    else:
        tensor, crop, flip = transform(image)
    return {"image": tensor, "target": int(target), "index": int(index), "crop": crop, "flip": flip}


def check_indices(indices: Sequence[int] | None, *, size: int, what: str) -> torch.Tensor | None:
    if indices is None:
        return None
    tensor = torch.as_tensor(list(indices), dtype=torch.long)
    if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= size):
        raise DataError(f"indices for {what} must lie in 0..{size - 1}")
    return tensor
