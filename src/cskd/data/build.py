"""Subsets, held-out splits and the (train, val) datasets built from a config."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from ..config.schema import DATASETS
from ..errors import DataError
from .fashion_mnist import FASHION_MNIST_ROOT, FashionMNIST, TranslatedFashionMNIST
from .folder import ImageFolderDataset, check_class_folders
from .sample import Transform, check_indices
from .synthetic import SyntheticImages
from .transforms import EvalTransform, TrainTransform


class SubsetDataset(Dataset):
    """The samples ``indices`` of ``dataset``, renumbered so that ``self[i]["index"] == i``."""

    def __init__(self, *, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = check_indices(indices, size=len(dataset), what=type(dataset).__name__)
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
        raise DataError(f"unknown data.dataset={kind!r}: use one of {', '.join(DATASETS)}")

    return make, official_val_split


def _eval_transform(data_cfg: Any, augment_cfg: Any) -> EvalTransform:
    return EvalTransform(
        image_size=data_cfg.image_size,
        crop_pct=data_cfg.eval_crop_pct,
        interpolation=augment_cfg.interpolation,
    )


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
    eval_transform = _eval_transform(data_cfg, augment_cfg)
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


def build_eval_set(data_cfg: Any, augment_cfg: Any, *, check_num_classes: bool = True) -> Dataset:
    """The validation set alone, as :func:`build_datasets` gives it; with ``data.val_split`` 0
    only the official split is read (an image folder needs only ``val/``). Raises DataError
    when its classes are not ``data.num_classes`` (``check_num_classes=False``: the caller
    compares the class names itself, as ``cskd eval`` does)."""
    if data_cfg.val_split:
        return build_datasets(data_cfg, augment_cfg)[1]
    make, official_val_split = _split_maker(data_cfg)
    val = make(official_val_split, _eval_transform(data_cfg, augment_cfg))
    if check_num_classes and len(val.classes) != data_cfg.num_classes:
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


def object_mask(dataset: Dataset, index: int) -> torch.Tensor | None:
    """The object's pixel mask for ``dataset[index]`` (through :class:`SubsetDataset`), or None
    for datasets that do not know where their object is."""
    while isinstance(dataset, SubsetDataset):
        dataset, index = dataset.dataset, int(dataset.indices[index])
    return dataset.object_mask(index) if hasattr(dataset, "object_mask") else None
