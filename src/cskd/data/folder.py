"""Image folders in the ImageNet layout: ``root/<split>/<class>/<image>``."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torchvision
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from .sample import Transform, make_sample

_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


_HIGH_BIT_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _load_image(path: str, mode: str = "RGB") -> Image.Image:
    """Read an image as 8-bit ``mode`` (RGB, or L for greyscale). 16-bit greyscale (PNG mode
    ``I;16``, or ``I``) is scaled from 0..65535 to 0..255 first: Pillow's own conversion clips
    it, making it almost white."""
    with Image.open(path) as image:
        if image.mode in _HIGH_BIT_DEPTH:
            levels = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
            levels = np.clip(levels, 0, 255).round().astype(np.uint8)
            return Image.fromarray(levels).convert(mode)
        return image.convert(mode)


def _visible(name: str) -> bool:
    """Hidden entries (``.ipynb_checkpoints``, ``.DS_Store``, ``._x.jpg``) are not data."""
    return not name.startswith(".")


class _VisibleImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder without hidden class folders or hidden files."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and _visible(e.name))
        if not classes:
            raise FileNotFoundError(f"no class folders in {directory}")
        return classes, {name: index for index, name in enumerate(classes)}

    @staticmethod
    def make_dataset(
        directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False
    ):
        def valid(path: str) -> bool:
            return _visible(os.path.basename(path)) and path.lower().endswith(
                torchvision.datasets.folder.IMG_EXTENSIONS
            )

        return torchvision.datasets.folder.make_dataset(
            directory, class_to_idx, None, valid, allow_empty=allow_empty
        )


class ImageFolderDataset(Dataset):
    """One split of an ImageNet-style tree: ``root/<split>/<class>/<image>``, read as RGB
    (``channels=3``) or greyscale (``channels=1``).

    A corrupt or truncated image raises DataError naming the file, unless ``skip_corrupt`` is
    set: then the next readable sample (index + 1, wrapping around) is returned in its place,
    still under the requested ``"index"``, and ``num_skipped`` is incremented. With DataLoader
    workers each worker holds its own copy, so ``num_skipped`` counts per worker (and the main
    process copy stays 0); use :func:`verify_images` for a full count.
    """

    def __init__(
        self,
        *,
        root: str | os.PathLike[str],
        split: str,
        transform: Transform | None = None,
        skip_corrupt: bool = False,
        channels: int = 3,
    ) -> None:
        if channels not in (1, 3):
            raise DataError(
                f"image folders are read as RGB (data.in_chans=3) or greyscale (data.in_chans=1), "
                f"not with {channels} channels"
            )
        self.mode = "RGB" if channels == 3 else "L"
        directory = Path(root) / split
        if not directory.is_dir():
            raise DataError(
                f"image folder not found: {directory} (expected {directory}/<class>/<image>; "
                "set data.root to the folder holding train/ and val/)"
            )
        if not any(entry.is_dir() and _visible(entry.name) for entry in os.scandir(directory)):
            raise DataError(
                f"no class folders in {directory}: expected {directory}/<class>/<image>.JPEG"
            )
        try:
            folder = _VisibleImageFolder(str(directory))
        except FileNotFoundError as error:
            message = str(error).replace("\n", " ")
            raise DataError(f"no usable images in {directory}: {message}") from None
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.classes: list[str] = list(folder.classes)
        self.class_to_idx: dict[str, int] = dict(folder.class_to_idx)
        self.samples: list[tuple[str, int]] = list(folder.samples)
        self.targets: list[int] = [target for _, target in self.samples]
        self.num_skipped = 0

    @property
    def paths(self) -> list[str]:
        """The image file paths, in sample order."""
        return [path for path, _ in self.samples]

    def identity(self) -> list[Any]:
        """What identifies the samples (for the teacher cache): the split, channels and every
        (path relative to the root, class) in order - the file list, not the file contents."""
        files = [[os.path.relpath(path, self.root), target] for path, target in self.samples]
        return [self.split, self.mode, files]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        source = index
        for _ in range(len(self.samples)):
            path, target = self.samples[source]
            try:
                image = _load_image(path, self.mode)
            except _IMAGE_ERRORS as error:
                if not self.skip_corrupt:
                    message = str(error).replace("\n", " ")
                    raise DataError(
                        f"corrupt or unreadable image {path} ({message}): delete or replace it, "
                        "or set data.skip_corrupt=true"
                    ) from None
                self.num_skipped += 1
                source = (source + 1) % len(self.samples)
                continue
            return make_sample(image, target, index, self.transform)
        raise DataError(f"no readable image in {self.root / self.split}: every file is corrupt")


def check_class_folders(root: str | os.PathLike[str]) -> None:
    """Raise DataError if ``root/train`` and ``root/val`` have different class folder names."""
    root = Path(root)
    names: dict[str, set[str]] = {}
    for split in ("train", "val"):
        directory = root / split
        if not directory.is_dir():
            raise DataError(f"image folder not found: {directory} (set data.root)")
        names[split] = {
            entry.name for entry in os.scandir(directory) if entry.is_dir() and _visible(entry.name)
        }
    only_train = sorted(names["train"] - names["val"])
    only_val = sorted(names["val"] - names["train"])
    if only_train or only_val:
        shown = [f"train/{name}" for name in only_train] + [f"val/{name}" for name in only_val]
        more = len(shown) - 5
        listed = ", ".join(shown[:5]) + (f" and {more} more" if more > 0 else "")
        raise DataError(
            f"class folders differ between {root / 'train'} and {root / 'val'} "
            f"({len(only_train)} only in train, {len(only_val)} only in val: {listed}); labels "
            "would not match: make both splits hold the same class folders"
        )


def verify_images(
    dataset_or_paths: Any | Iterable[str | os.PathLike[str]], *, limit: int | None = None
) -> list[str]:
    """Fully decode images and return the paths of those that are corrupt or truncated.

    Accepts a dataset with a ``paths`` attribute (:class:`ImageFolderDataset`,
    :class:`SubsetDataset` of one) or ``samples`` (torchvision ``ImageFolder``), or an iterable
    of paths. ``limit`` checks only the first ``limit`` files.
    """
    if hasattr(dataset_or_paths, "paths"):
        paths: Iterable[Any] = dataset_or_paths.paths
    elif hasattr(dataset_or_paths, "samples"):
        paths = (path for path, _ in dataset_or_paths.samples)
    else:
        paths = dataset_or_paths
    corrupt: list[str] = []
    for number, path in enumerate(paths):
        if limit is not None and number >= limit:
            break
        try:
            with Image.open(path) as image:
                image.load()
        except _IMAGE_ERRORS:
            corrupt.append(str(path))
    return corrupt
