"""Datasets and image transforms for CSKD training and evaluation.

Every dataset here returns, for ``dataset[i]``, one dict that the default DataLoader collate
batches::

    {"image": FloatTensor C x S x S in [0, 1] (not normalised; that happens on the device),
     "target": int,
     "index": int (always ``i``: the key for per-sample caches such as teacher maps),
     "crop": FloatTensor [top, left, height, width] in the original image's pixels (whole
             pixels for training crops, fractional for the evaluation crop),
     "flip": bool tensor (whether the crop was mirrored horizontally)}

The crop box and flip let the training step map cached per-image teacher outputs onto the
augmented view. Random erasing and Mixup/CutMix are not applied here: they run on the device
batch. Random transforms draw from the global ``torch``, ``random`` and ``numpy`` generators
(as torchvision and timm do), which the DataLoader seeds per worker, so seeding makes runs
reproducible.

Sources: an ImageNet-style folder tree (``root/train/<class>/*.JPEG``, ``root/val/<class>/...``),
Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (or torchvision's download), and
a synthetic, learnable, deterministic set for smoke tests. :func:`build_datasets` builds the
(train, val) pair from the configuration.
"""

from __future__ import annotations

import copy
import gzip
import math
import os
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, RandomResizedCrop

__all__ = [
    "DataError",
    "read_idx",
    "FASHION_MNIST_ROOT",
    "FASHION_MNIST_CLASSES",
    "FashionMNIST",
    "TranslatedFashionMNIST",
    "SyntheticImages",
    "ImageFolderDataset",
    "SubsetDataset",
    "check_class_folders",
    "verify_images",
    "posterize",
    "rand_augment",
    "TrainTransform",
    "EvalTransform",
    "make_sample",
    "split_indices",
    "build_datasets",
    "build_test_set",
    "object_mask",
]


class DataError(ValueError):
    """A dataset or transform cannot be built or read; the message names the path and the fix."""


# --------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------

TransformResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Transform = Callable[[Image.Image], TransformResult]


def _interpolation_mode(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name)
    except ValueError:
        allowed = ", ".join(mode.value for mode in InterpolationMode)
        raise DataError(f"unknown interpolation {name!r}: use one of {allowed}") from None


def _crop_tensor(top: float, left: float, height: float, width: float) -> torch.Tensor:
    return torch.tensor([top, left, height, width], dtype=torch.float32)


def posterize(image: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Keep the ``bits_to_keep`` most significant bits of each channel; 0 or fewer gives black.

    timm's RandAugment asks for 0 bits when a magnitude drawn with ``mstd`` is clipped to its
    maximum (``PosterizeIncreasing`` at magnitude 10, ``Posterize`` at 0). Pillow before 9.x
    returned a black image for 0 bits, which is what DeiT and the CSKD release trained with;
    Pillow 10 and later raise ``ValueError``. This keeps the old result for every bit count.
    """
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return image.point([0] * 256 * len(image.getbands()))
    return ImageOps.posterize(image, bits_to_keep)


def rand_augment(config: str, hparams: dict[str, Any]) -> Callable[[Image.Image], Image.Image]:
    """timm's RandAugment for ``config`` (e.g. ``rand-m9-mstd0.5-inc1``), with :func:`posterize`
    in place of timm's for the posterize ops, so that no magnitude it can draw raises.

    Only the op's function is replaced: the ops, their probabilities and the random draws
    (op choice, magnitude, sign) are timm's, so the distribution of augmented images is the
    reference pipeline's. Raises what timm raises for a malformed ``config``.
    """
    from timm.data import auto_augment

    transform = auto_augment.rand_augment_transform(config, hparams)
    for op in transform.ops:
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = posterize
    return transform


class TrainTransform:
    """Training augmentation: RandomResizedCrop, horizontal flip, RandAugment, ToTensor.

    Calling it on a PIL image returns ``(image, crop, flip)``: a float tensor C x S x S in
    [0, 1], the crop box ``[top, left, height, width]`` in the input image's pixels, and a bool
    tensor telling whether the crop was mirrored. Cropping the input with that box (resizing to
    S x S with ``interpolation``) and mirroring reproduces the image before RandAugment.

    ``randaugment`` is a timm config string (``""`` turns it off). Single-channel ("L") images
    get RandAugment with a grey fill value (the mean of ``mean``). ``color_jitter`` follows
    timm: it is applied (brightness, contrast, saturation) only when RandAugment is off.
    """

    def __init__(
        self,
        *,
        image_size: int,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        randaugment: str = "rand-m9-mstd0.5-inc1",
        color_jitter: float = 0.0,
        interpolation: str = "bicubic",
        mean: Sequence[float] = (0.485, 0.456, 0.406),
    ) -> None:
        if image_size <= 0:
            raise DataError(f"image_size must be positive, got {image_size}")
        if not 0.0 <= hflip <= 1.0:
            raise DataError(f"hflip must be a probability in [0, 1], got {hflip}")
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise DataError(f"scale must be (low, high) with 0 < low <= high <= 1, got {scale}")
        if len(ratio) != 2 or not 0.0 < ratio[0] <= ratio[1]:
            raise DataError(f"ratio must be (low, high) with 0 < low <= high, got {ratio}")
        if color_jitter < 0:
            raise DataError(f"color_jitter must be >= 0, got {color_jitter}")
        self.image_size = image_size
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = hflip
        self.interpolation = _interpolation_mode(interpolation)
        self.randaugment_rgb: Callable[[Image.Image], Image.Image] | None = None
        self.randaugment_gray: Callable[[Image.Image], Image.Image] | None = None
        self.color_jitter: Callable[[Image.Image], Image.Image] | None = None
        if randaugment:
            if not randaugment.startswith("rand"):
                raise DataError(
                    f"augment.randaugment={randaugment!r} is not a RandAugment config: use e.g. "
                    "'rand-m9-mstd0.5-inc1', or '' to turn it off"
                )
            from timm.data.transforms import str_to_pil_interp

            fill = tuple(round(255 * m) for m in mean)
            base_hparams = dict(
                translate_const=int(image_size * 0.45),
                interpolation=str_to_pil_interp(interpolation),
            )
            try:
                self.randaugment_rgb = rand_augment(randaugment, dict(base_hparams, img_mean=fill))
                # PIL geometric ops on "L" images need a single fill value, not an RGB triple.
                self.randaugment_gray = rand_augment(
                    randaugment, dict(base_hparams, img_mean=round(sum(fill) / len(fill)))
                )
            except (AssertionError, ValueError, KeyError) as error:
                raise DataError(
                    f"invalid augment.randaugment={randaugment!r} ({error or 'bad section'}): "
                    "use e.g. 'rand-m9-mstd0.5-inc1'"
                ) from None
        elif color_jitter > 0:
            self.color_jitter = torchvision.transforms.ColorJitter(
                brightness=color_jitter, contrast=color_jitter, saturation=color_jitter
            )

    def __call__(self, image: Image.Image) -> TransformResult:
        top, left, height, width = RandomResizedCrop.get_params(image, self.scale, self.ratio)
        size = [self.image_size, self.image_size]
        image = TF.resized_crop(image, top, left, height, width, size, self.interpolation)
        flip = bool(torch.rand(1).item() < self.hflip)
        if flip:
            image = TF.hflip(image)
        if self.randaugment_rgb is not None:
            augment = self.randaugment_gray if image.mode == "L" else self.randaugment_rgb
            image = augment(image)
        if self.color_jitter is not None:
            image = self.color_jitter(image)
        return TF.to_tensor(image), _crop_tensor(top, left, height, width), torch.tensor(flip)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, scale={self.scale}, "
            f"ratio={self.ratio}, hflip={self.hflip}, interpolation={self.interpolation.value}, "
            f"randaugment={self.randaugment_rgb is not None}, "
            f"color_jitter={self.color_jitter is not None})"
        )


class EvalTransform:
    """The standard evaluation protocol, as timm and DeiT apply it: resize the shorter side to
    ``floor(image_size / crop_pct)`` (256 for 224 px at 0.875), then take the central
    ``image_size`` square.

    The pixels come from timm's own ``transforms_imagenet_eval`` (so they equal timm's and
    DeiT's evaluation input exactly); :meth:`crop_box` gives the region of the original image
    they show. Returns ``(image, crop, flip)`` like :class:`TrainTransform`, flip always False;
    the box is fractional here (a resize then a whole-pixel crop of the resized image).
    """

    def __init__(
        self, *, image_size: int, crop_pct: float = 0.875, interpolation: str = "bicubic"
    ) -> None:
        if image_size <= 0:
            raise DataError(f"image_size must be positive, got {image_size}")
        if not 0.0 < crop_pct <= 1.0:
            raise DataError(f"data.eval_crop_pct must be in (0, 1], got {crop_pct}")
        from timm.data.transforms_factory import transforms_imagenet_eval

        self.image_size = image_size
        self.crop_pct = crop_pct
        self.interpolation = _interpolation_mode(interpolation)
        self.resize_to = math.floor(image_size / crop_pct)  # the shorter side before cropping
        # normalize=False: uint8 tensors, turned into [0, 1] floats exactly as ToTensor does
        self.pipeline = transforms_imagenet_eval(
            img_size=image_size,
            crop_pct=crop_pct,
            interpolation=interpolation,
            normalize=False,
        )

    def crop_box(self, *, height: int, width: int) -> tuple[float, float, float, float]:
        """``(top, left, height, width)`` in input pixels of the region the output shows.

        torchvision's ``Resize(s)`` scales the shorter side to ``s`` and the longer one to
        ``int(s * longer / shorter)``; ``CenterCrop(S)`` then starts at
        ``round((resized - S) / 2)`` on each axis.
        """
        short, long = min(height, width), max(height, width)
        resized_long = int(self.resize_to * long / short)
        resized_h, resized_w = (
            (self.resize_to, resized_long) if height <= width else (resized_long, self.resize_to)
        )
        scale_h, scale_w = height / resized_h, width / resized_w
        top = round((resized_h - self.image_size) / 2) * scale_h
        left = round((resized_w - self.image_size) / 2) * scale_w
        return top, left, self.image_size * scale_h, self.image_size * scale_w

    def __call__(self, image: Image.Image) -> TransformResult:
        box = self.crop_box(height=image.height, width=image.width)
        tensor = self.pipeline(image).float().div_(255)  # (C, S, S), as TF.to_tensor gives
        return tensor, torch.tensor(box, dtype=torch.float32), torch.tensor(False)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, crop_pct={self.crop_pct}, "
            f"interpolation={self.interpolation.value})"
        )


def make_sample(
    image: Image.Image, target: int, index: int, transform: Transform | None
) -> dict[str, Any]:
    """Build the per-sample dict shared by all datasets (see the module docstring).

    ``transform`` maps a PIL image to ``(image tensor, crop box, flip)``; with None the whole
    image is converted to a tensor, with the full-image crop box and no flip.
    """
    if transform is None:
        tensor = TF.to_tensor(image)
        crop = _crop_tensor(0, 0, image.height, image.width)
        flip = torch.tensor(False)
    else:
        tensor, crop, flip = transform(image)
    return {"image": tensor, "target": int(target), "index": int(index), "crop": crop, "flip": flip}


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------

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
            raise DataError(
                f"Fashion-MNIST not found in {root}: install the Debian package "
                "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or set "
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
        self.indices = _check_indices(indices, size=images.shape[0], what=f"Fashion-MNIST {split}")

    def __len__(self) -> int:
        return self.images.shape[0] if self.indices is None else len(self.indices)

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


def object_mask(dataset: Dataset, index: int) -> torch.Tensor | None:
    """The object's pixel mask for ``dataset[index]`` (through :class:`SubsetDataset`), or None
    for datasets that do not know where their object is."""
    while isinstance(dataset, SubsetDataset):
        dataset, index = dataset.dataset, int(dataset.indices[index])
    return dataset.object_mask(index) if hasattr(dataset, "object_mask") else None


def _check_indices(indices: Sequence[int] | None, *, size: int, what: str) -> torch.Tensor | None:
    if indices is None:
        return None
    tensor = torch.as_tensor(list(indices), dtype=torch.long)
    if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= size):
        raise DataError(f"indices for {what} must lie in 0..{size - 1}")
    return tensor


# --------------------------------------------------------------------------------------------
# Synthetic images
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Image folders (ImageNet layout)
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Subsets and the (train, val) pair
# --------------------------------------------------------------------------------------------


class SubsetDataset(Dataset):
    """The samples ``indices`` of ``dataset``, renumbered so that ``self[i]["index"] == i``."""

    def __init__(self, *, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = _check_indices(indices, size=len(dataset), what=type(dataset).__name__)
        self.classes = getattr(dataset, "classes", None)

    @property
    def paths(self) -> list[str]:
        """The image file paths in sample order (only for datasets that have ``paths``)."""
        base_paths = self.dataset.paths
        return [base_paths[i] for i in self.indices.tolist()]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[int(self.indices[index])]
        sample["index"] = index
        return sample


def split_indices(
    *, size: int, train_subset: int, val_split: int, seed: int
) -> tuple[list[int] | None, list[int] | None]:
    """Choose training and held-out validation indices out of ``size`` training images.

    Returns ``(train, val)``, each sorted, or None for "all training images" / "use the
    official validation split". A permutation seeded with ``seed`` is split into the first
    ``val_split`` indices (validation) and, of the rest, the first ``train_subset`` (training,
    0 = all the rest): the two never overlap and depend only on the arguments.
    """
    if train_subset < 0 or val_split < 0:
        raise DataError(
            f"data.train_subset ({train_subset}) and data.val_split ({val_split}) must be >= 0"
        )
    if train_subset == 0 and val_split == 0:
        return None, None
    if val_split >= size or val_split + train_subset > size:
        raise DataError(
            f"data.val_split={val_split} plus data.train_subset={train_subset} exceeds the "
            f"{size} training images (val_split must leave some for training): lower them"
        )
    permutation = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    val = sorted(permutation[:val_split]) if val_split else None
    rest = permutation[val_split:]
    train = sorted(rest[:train_subset] if train_subset else rest)
    return train, val


def _split_maker(data_cfg: Any) -> tuple[Callable[[str, Transform], Dataset], str]:
    """``(make(split, transform) -> Dataset, name of the official validation split)`` for
    ``data.dataset``; raises DataError for an unknown dataset or impossible channels."""
    kind = data_cfg.dataset
    if kind in ("fashion_mnist", "translated_fashion_mnist"):
        if data_cfg.in_chans != 1:
            raise DataError(
                f"Fashion-MNIST images have 1 channel but data.in_chans={data_cfg.in_chans}: "
                "set data.in_chans=1"
            )
        root = data_cfg.root or FASHION_MNIST_ROOT
        placed = {}
        if kind == "translated_fashion_mnist":
            placed = {"canvas_size": data_cfg.canvas_size, "clutter": data_cfg.clutter}
        dataset_class = TranslatedFashionMNIST if placed else FashionMNIST

        def make(split: str, transform: Transform) -> Dataset:
            return dataset_class(
                root=root, split=split, transform=transform, download=data_cfg.download, **placed
            )

        official_val_split = "test"
    elif kind == "folder":
        if not data_cfg.root:
            raise DataError("data.dataset=folder needs data.root (the folder with train/, val/)")
        if data_cfg.in_chans not in (1, 3):
            raise DataError(
                f"image folders are read as RGB or greyscale but data.in_chans="
                f"{data_cfg.in_chans}: set data.in_chans=3 (or 1 for greyscale)"
            )

        def make(split: str, transform: Transform) -> Dataset:
            return ImageFolderDataset(
                root=data_cfg.root,
                split=split,
                transform=transform,
                skip_corrupt=data_cfg.skip_corrupt,
                channels=data_cfg.in_chans,
            )

        official_val_split = "val"
    elif kind == "synthetic":
        sizes = {"train": data_cfg.synthetic_size, "val": max(data_cfg.synthetic_size // 4, 8)}

        def make(split: str, transform: Transform) -> Dataset:
            return SyntheticImages(
                size=sizes[split],
                num_classes=data_cfg.num_classes,
                image_size=data_cfg.image_size,
                channels=data_cfg.in_chans,
                seed=0 if split == "train" else 1,
                transform=transform,
            )

        official_val_split = "val"
    else:
        raise DataError(
            f"unknown data.dataset={kind!r}: use 'folder', 'fashion_mnist', "
            "'translated_fashion_mnist' or 'synthetic'"
        )

    return make, official_val_split


def build_datasets(data_cfg: Any, augment_cfg: Any) -> tuple[Dataset, Dataset]:
    """Build the (train, val) datasets from the data and augment configs.

    Validation always uses :class:`EvalTransform`. With ``data_cfg.val_split > 0`` the
    validation set is held out of the training images (disjoint from the training subset),
    so the official test/val split is only touched for final numbers.
    """
    train_transform = TrainTransform(
        image_size=data_cfg.image_size,
        scale=tuple(augment_cfg.scale),
        hflip=augment_cfg.hflip,
        randaugment=augment_cfg.randaugment,
        color_jitter=augment_cfg.color_jitter,
        interpolation=augment_cfg.interpolation,
        mean=tuple(data_cfg.mean),
    )
    eval_transform = EvalTransform(
        image_size=data_cfg.image_size,
        crop_pct=data_cfg.eval_crop_pct,
        interpolation=augment_cfg.interpolation,
    )
    make, official_val_split = _split_maker(data_cfg)
    if data_cfg.dataset == "folder" and data_cfg.val_split == 0:
        check_class_folders(data_cfg.root)
    full_train = make("train", train_transform)
    classes = full_train.classes
    if len(classes) != data_cfg.num_classes:
        raise DataError(
            f"data.num_classes={data_cfg.num_classes} but the {data_cfg.dataset} dataset has "
            f"{len(classes)} "
            f"classes: set data.num_classes={len(classes)}"
        )
    train_indices, val_indices = split_indices(
        size=len(full_train),
        train_subset=data_cfg.train_subset,
        val_split=data_cfg.val_split,
        seed=data_cfg.subset_seed,
    )
    train = full_train
    if train_indices is not None:
        train = SubsetDataset(dataset=full_train, indices=train_indices)
    if val_indices is None:
        val = make(official_val_split, eval_transform)
    else:
        # Same images as training (no second read or scan), seen through the eval transform.
        held_out = copy.copy(full_train)
        held_out.transform = eval_transform
        val = SubsetDataset(dataset=held_out, indices=val_indices)
    return train, val


def build_eval_set(data_cfg: Any, augment_cfg: Any) -> Dataset:
    """The validation set alone, as :func:`build_datasets` gives it; with ``data.val_split`` 0
    only the official split is read (an image folder needs only ``val/``). Raises DataError
    when its classes are not ``data.num_classes``."""
    if data_cfg.val_split:
        return build_datasets(data_cfg, augment_cfg)[1]
    make, official_val_split = _split_maker(data_cfg)
    transform = EvalTransform(
        image_size=data_cfg.image_size,
        crop_pct=data_cfg.eval_crop_pct,
        interpolation=augment_cfg.interpolation,
    )
    val = make(official_val_split, transform)
    if len(val.classes) != data_cfg.num_classes:
        raise DataError(
            f"data.num_classes={data_cfg.num_classes} but the {data_cfg.dataset} "
            f"{official_val_split} split has {len(val.classes)} classes: evaluate on data with "
            "the model's classes"
        )
    return val


def build_test_set(data_cfg: Any, augment_cfg: Any) -> Dataset:
    """The official test (or val) split through :class:`EvalTransform`: what
    :func:`build_datasets` gives as validation set when ``data.val_split`` is 0. For runs that
    make their choices on a held-out split and report on the official one."""
    official = copy.copy(data_cfg)
    official.val_split, official.train_subset = 0, 0
    return build_datasets(official, augment_cfg)[1]
