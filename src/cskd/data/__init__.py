"""Data: datasets, transforms, sampling (one module each), built from the config.

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
batch. Random transforms draw from the global ``torch``, ``random`` and ``numpy`` generators (as
torchvision and timm do), which ``sampling.SeededSamples`` seeds per sample from (run seed, epoch,
rank, position), so augmentation depends neither on the workers nor on where a run resumed.

Sources: an ImageNet-style folder tree (``root/train/<class>/*.JPEG``, ``root/val/<class>/...``),
Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (or torchvision's download), and
a synthetic, learnable, deterministic set for smoke tests. :func:`build_datasets` builds the
(train, val) pair from the configuration.

Modules: ``sample`` (the sample dict), ``transforms``, ``fashion_mnist``,
``folder``, ``synthetic``, ``build`` (subsets, held-out splits, the builders) and ``sampling``
(reproducible ``(index, seed)`` order and the loaders).
"""

from __future__ import annotations

from ..errors import DataError
from .build import (
    SubsetDataset,
    build_datasets,
    build_eval_set,
    build_test_set,
    object_mask,
    split_indices,
)
from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    FashionMNIST,
    TranslatedFashionMNIST,
    read_idx,
)
from .folder import ImageFolderDataset, check_class_folders, verify_images
from .sample import make_sample
from .synthetic import SyntheticImages
from .transforms import EvalTransform, TrainTransform, posterize, rand_augment

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
    "build_eval_set",
    "build_test_set",
    "object_mask",
]
