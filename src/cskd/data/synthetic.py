"""Deterministic synthetic images with a learnable class signal (smoke tests)."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from .sample import Transform, make_sample

_PATTERN_SEED = 20_230_101
_PATTERN_GRID = 4


class SyntheticImages(Dataset):
    """Deterministic random images with a weak, learnable class signal (for smoke tests).

    Sample ``i`` has label ``i % num_classes`` and is drawn from a generator seeded with
    ``seed * 1_000_003 + i``: noise on top of a class-specific smooth brightness pattern and
    per-channel tint. The class patterns do not depend on ``seed``, so datasets built with
    different seeds (e.g. train and val) share the same task. Images are PIL "RGB"
    (``channels=3``) or "L" (``channels=1``).
    """

    def __init__(
        self,
        *,
        size: int,
        num_classes: int,
        image_size: int,
        channels: int = 3,
        seed: int = 0,
        transform: Transform | None = None,
    ) -> None:
        if size <= 0:
            raise DataError(f"synthetic dataset size must be positive, got {size}")
        if num_classes <= 0:
            raise DataError(f"num_classes must be positive, got {num_classes}")
        if image_size <= 0:
            raise DataError(f"image_size must be positive, got {image_size}")
        if channels not in (1, 3):
            raise DataError(
                f"synthetic images need 1 or 3 channels (data.in_chans), got {channels}"
            )
        self.size = size
        self.num_classes = num_classes
        self.image_size = image_size
        self.channels = channels
        self.seed = seed
        self.transform = transform
        self.classes = [f"class_{c}" for c in range(num_classes)]
        generator = torch.Generator().manual_seed(_PATTERN_SEED)
        grid = _PATTERN_GRID
        # Low-resolution patterns, upsampled per sample, keep memory small for many classes.
        self._patterns = torch.rand(num_classes, channels, grid, grid, generator=generator) * 2 - 1
        self._tints = torch.rand(num_classes, channels, 1, 1, generator=generator) * 2 - 1

    def identity(self) -> list[Any]:
        return [self.size, self.num_classes, self.image_size, self.channels, self.seed]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for SyntheticImages of size {self.size}")
        target = index % self.num_classes
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        size = self.image_size
        pattern = torch.nn.functional.interpolate(
            self._patterns[target : target + 1], size=(size, size), mode="bilinear"
        )[0]
        noise = torch.randn(self.channels, size, size, generator=generator)
        pixels = (0.5 + 0.15 * self._tints[target] + 0.15 * pattern + 0.12 * noise).clamp(0, 1)
        array = (pixels * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        image = Image.fromarray(array[:, :, 0] if self.channels == 1 else array)
        return make_sample(image, target, index, self.transform)
