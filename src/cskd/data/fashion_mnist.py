"""Fashion-MNIST from IDX files, and translated / cluttered Fashion-MNIST."""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from .sample import Transform, check_indices, make_sample

_IDX_UINT8 = 0x08


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an IDX file (optionally gzip-compressed) holding uint8 data into a uint8 tensor.

    Labels files have magic 0x00000801 (1-d), image files 0x00000803 (N x rows x cols).
    Raises DataError naming the path if the file is missing, truncated or corrupt.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"IDX file not found: {path}") from None
    except OSError as error:
        raise DataError(f"cannot read IDX file {path}: {error}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as error:
            raise DataError(
                f"corrupt or truncated gzip file {path} ({error}): delete it and reinstall or "
                "re-download the dataset"
            ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UINT8 or raw[3] == 0:
        raise DataError(
            f"not a uint8 IDX file (bad magic number {raw[:4].hex() or 'empty'}): {path}"
        )
    num_dims = raw[3]
    header_size = 4 + 4 * num_dims
    if len(raw) < header_size:
        raise DataError(f"truncated IDX file (incomplete header): {path}")
    shape = [int.from_bytes(raw[4 + 4 * d : 8 + 4 * d], "big") for d in range(num_dims)]
    expected = header_size + math.prod(shape)
    if len(raw) < expected:
        raise DataError(
            f"truncated IDX file {path}: expected {expected} bytes for shape {shape}, "
            f"found {len(raw)}; reinstall or re-download the dataset"
        )
    if len(raw) > expected:
        raise DataError(
            f"corrupt IDX file {path}: {len(raw) - expected} unexpected trailing bytes after "
            f"data of shape {shape}"
        )
    data = bytearray(raw[header_size:])
    if not data:
        return torch.zeros(shape, dtype=torch.uint8)
    return torch.frombuffer(data, dtype=torch.uint8).reshape(shape)


FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_fashion_file(root: Path, name: str) -> Path | None:
    """Look for NAME(.gz) directly in root (Debian layout) or in torchvision's FashionMNIST/raw."""
    for folder in (root, root / "FashionMNIST" / "raw"):
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
    return None


class FashionMNIST(Dataset):
    """Fashion-MNIST (28 x 28 grey images, 10 classes) read into memory from IDX files.

    Looks in ``root`` for the Debian package's ``*-ubyte.gz`` files, or torchvision's
    ``root/FashionMNIST/raw`` layout. With ``download=True`` missing files are fetched with
    torchvision into ``root``. ``indices`` restricts the dataset to those images (in that
    order); ``dataset[i]["index"]`` is then ``i``. Images reach the transform as PIL "L".
    """

    def __init__(
        self,
        *,
        root: str | os.PathLike[str] = FASHION_MNIST_ROOT,
        split: str = "train",
        indices: Sequence[int] | None = None,
        transform: Transform | None = None,
        download: bool = False,
    ) -> None:
        if split not in _FASHION_FILES:
            raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        root = Path(root)
        image_name, label_name = _FASHION_FILES[split]
        image_path = _find_fashion_file(root, image_name)
        label_path = _find_fashion_file(root, label_name)
        if (image_path is None or label_path is None) and download:
            try:
                torchvision.datasets.FashionMNIST(str(root), train=split == "train", download=True)
            except Exception as error:  # network, permissions, checksum: report them all
                message = str(error).replace("\n", " ")
                raise DataError(
                    f"could not download Fashion-MNIST into {root} ({message}): set data.root to "
                    "a writable folder or install the Debian package dataset-fashion-mnist"
                ) from None
            image_path = _find_fashion_file(root, image_name)
            label_path = _find_fashion_file(root, label_name)
        if image_path is None or label_path is None:
            missing = image_name if image_path is None else label_name
            raise DataError(
                f"Fashion-MNIST's {missing} (.gz or not) is not in {root}: set data.root to the "
                'folder holding the *-ubyte files, data.root="" for the Debian package '
                "dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or "
                "data.download=true"
            )
        images = read_idx(image_path)
        labels = read_idx(label_path)
        if images.dim() != 3:
            raise DataError(f"expected N x rows x cols images in {image_path}, got {images.shape}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(
                f"labels in {label_path} (shape {list(labels.shape)}) do not match the "
                f"{images.shape[0]} images in {image_path}"
            )
        if labels.numel() and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"label {int(labels.max())} out of range 0..9 in {label_path}")
        self.root = root
        self.split = split
        self.images = images
        self.labels = labels
        self.classes = list(FASHION_MNIST_CLASSES)
        self.transform = transform
        self.indices = check_indices(indices, size=images.shape[0], what=f"Fashion-MNIST {split}")

    def __len__(self) -> int:
        return self.images.shape[0] if self.indices is None else len(self.indices)

    def identity(self) -> list[Any]:
        """What identifies the samples (for the teacher cache): split, the SHA-256 of the
        images and labels, and ``indices``."""
        digest = hashlib.sha256(self.images.numpy().tobytes())
        digest.update(self.labels.numpy().tobytes())
        indices = None if self.indices is None else self.indices.tolist()
        return [self.split, digest.hexdigest(), indices]

    def __getitem__(self, index: int) -> dict[str, Any]:
        source = index if self.indices is None else int(self.indices[index])
        image = Image.fromarray(self.images[source].numpy())
        return make_sample(image, int(self.labels[source]), index, self.transform)


class TranslatedFashionMNIST(FashionMNIST):
    """Fashion-MNIST garments placed on a larger canvas, optionally among clutter.

    Sample ``i`` is its 28 x 28 garment pasted at a random position on a black
    ``canvas_size`` x ``canvas_size`` canvas (the translated-MNIST construction), plus
    ``clutter`` fragments (``fragment_size`` px squares cut at random from other garments of the
    same split, pasted at random positions, pixel-wise maximum; the cluttered-MNIST
    construction). The label is the placed garment's. Everything is drawn from a generator
    seeded by (``placement_seed``, split, the image's index in the IDX file), so every run,
    subset and worker sees the same canvases. Images reach the transform as PIL "L".

    This gives the teacher's dense map what ImageNet photos have and whole-image garments lack:
    cells that hold the object and cells that hold background or distractors.
    """

    def __init__(
        self,
        *,
        canvas_size: int = 64,
        clutter: int = 0,
        fragment_size: int = 10,
        placement_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        side = self.images.shape[-1]
        if canvas_size < side:
            raise DataError(
                f"data.canvas_size={canvas_size} is smaller than the {side} px garments: use "
                f"{side} or more"
            )
        if clutter < 0 or not 0 < fragment_size <= side:
            raise DataError(
                f"data.clutter ({clutter}) must be >= 0 and the fragment size ({fragment_size}) "
                f"in 1..{side}"
            )
        self.canvas_size = canvas_size
        self.clutter = clutter
        self.fragment_size = fragment_size
        self.placement_seed = placement_seed

    def identity(self) -> list[Any]:
        layout = [self.canvas_size, self.clutter, self.fragment_size, self.placement_seed]
        return [*super().identity(), layout]

    def placement(self, source: int) -> tuple[int, int]:
        """(top, left) of the garment of IDX image ``source`` on its canvas."""
        return self._layout(source)[0]

    def _layout(self, source: int) -> tuple[tuple[int, int], list[tuple[int, int, int, int, int]]]:
        """The garment's (top, left), and per fragment (donor, donor top, donor left, top, left)."""
        split_id = 0 if self.split == "train" else 1
        rng = np.random.default_rng([self.placement_seed, split_id, source])
        side, fragment = self.images.shape[-1], self.fragment_size
        free = self.canvas_size - side
        top, left = (int(v) for v in rng.integers(0, free + 1, size=2))
        fragments = []
        for _ in range(self.clutter):
            donor = int(rng.integers(0, self.images.shape[0] - 1))
            donor += donor >= source  # never the garment itself
            donor_top, donor_left = (int(v) for v in rng.integers(0, side - fragment + 1, size=2))
            at_top, at_left = (
                int(v) for v in rng.integers(0, self.canvas_size - fragment + 1, size=2)
            )
            fragments.append((donor, donor_top, donor_left, at_top, at_left))
        return (top, left), fragments

    def canvas(self, source: int) -> torch.Tensor:
        """The uint8 canvas (S, S) of IDX image ``source``."""
        (top, left), fragments = self._layout(source)
        side, fragment = self.images.shape[-1], self.fragment_size
        canvas = torch.zeros(self.canvas_size, self.canvas_size, dtype=torch.uint8)
        for donor, donor_top, donor_left, at_top, at_left in fragments:
            piece = self.images[
                donor, donor_top : donor_top + fragment, donor_left : donor_left + fragment
            ]
            region = canvas[at_top : at_top + fragment, at_left : at_left + fragment]
            torch.maximum(region, piece, out=region)
        region = canvas[top : top + side, left : left + side]
        torch.maximum(region, self.images[source], out=region)
        return canvas

    def __getitem__(self, index: int) -> dict[str, Any]:
        source = index if self.indices is None else int(self.indices[index])
        image = Image.fromarray(self.canvas(source).numpy())
        return make_sample(image, int(self.labels[source]), index, self.transform)

    def object_mask(self, index: int) -> torch.Tensor:
        """Bool (S, S) on the canvas: the pixels of sample ``index``'s own garment (not clutter)."""
        source = index if self.indices is None else int(self.indices[index])
        (top, left), _ = self._layout(source)
        side = self.images.shape[-1]
        mask = torch.zeros(self.canvas_size, self.canvas_size, dtype=torch.bool)
        mask[top : top + side, left : left + side] = self.images[source] > 25  # 10% of 255
        return mask
