"""The teacher-response cache on disk: a versioned, self-describing, sharded record of a frozen
teacher's dense logits for every training image, and the full-image view it is made from.

Layout of a cache directory::

    cache.json                   header, written last (when every shard is complete)
    shard-00000.json             per shard: its images and the SHA-256 of each of its files
    shard-00000-logits.npy       (n, K, Hc, Wc) float16/float32: every class      (topk = 0)
    shard-00000-values.npy       (n, k, Hc, Wc) the k largest logits per cell     (topk = k)
    shard-00000-indices.npy      (n, k, Hc, Wc) int16/int32: their classes        (topk = k)
    shard-00000-sizes.npy        (n, 2) int32: each original image's height, width in pixels

Image ``i`` of the training set (its ``sample["index"]``) lies in shard ``i // shard_size`` at
row ``i % shard_size``. What is stored per image is the teacher's map of the *whole* image,
resized to ``cache_size`` x ``cache_size`` pixels (no crop, flip or RandAugment): a training
step rebuilds its targets from it for the crop box and flip the sample recorded
(:mod:`cskd.teacher.cached`). A shard's content depends only on its images, so neither the
number of loader workers nor of ranks changes it; shards are written atomically (temporary
file, then rename), so a killed build resumes at the first missing shard.

The header names what the cache was made from (teacher name and weights digest, the training
set's digest, the training image size, class count, grids, storage), and :func:`open_cache`
refuses, in one line each, a cache whose header disagrees with the run, or whose files are
missing, truncated or altered.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset

from ..data.sample import TransformResult, crop_tensor
from ..errors import CacheError
from ..infra.checkpoint import atomic_write

FORMAT = "cskd-teacher-cache"
VERSION = 1
HEADER = "cache.json"
# every header key -> the config key that sets it, for the messages (one table for the run's
# check and for `cskd cache`'s check of a started directory)
CONFIG_KEYS = {
    "teacher_name": "teacher.name",
    "image_size": "data.image_size",
    "train_grid": "data.image_size",
    "num_classes": "data.num_classes",
    "teacher_weights_sha256": "teacher.checkpoint / teacher.pretrained_tag (the weights)",
    "teacher_mean": "teacher.mean",
    "teacher_std": "teacher.std",
    "teacher_kwargs": "teacher.kwargs",
    "teacher_precision": "teacher.amp",
    "data_digest": "data.* (the training images, subset and labels)",
    "images": "data.*",
    "cache_size": "teacher.cache_size",
    "map_grid": "teacher.cache_size",
    "topk": "teacher.cache_topk",
    "dtype": "teacher.cache_dtype",
    "shard_size": "teacher.cache_shard_size",
    "interpolation": "augment.interpolation",
}
# what must agree between a cache and a run that uses it, the most specific first: a change of
# image size also changes synthetic data
MUST_MATCH = (
    "teacher_name",
    "image_size",
    "num_classes",
    "teacher_weights_sha256",
    "teacher_mean",
    "teacher_std",
    "data_digest",
)


class FullImageTransform:
    """The whole image, resized to ``size`` x ``size`` (no crop, no flip): the teacher's input
    when a cache is built. Returns ``(image, crop, flip)`` like the training transform, the crop
    box being the whole original image ``[0, 0, height, width]``."""

    def __init__(self, *, size: int, interpolation: str = "bicubic") -> None:
        from ..data.transforms import _interpolation_mode

        self.size = size
        self.interpolation = _interpolation_mode(interpolation)

    def __call__(self, image: Image.Image) -> TransformResult:
        resized = TF.resize(image, [self.size, self.size], self.interpolation, antialias=True)
        box = crop_tensor(0, 0, image.height, image.width)
        return TF.to_tensor(resized), box, torch.tensor(False)


def with_transform(dataset: Dataset, transform) -> Dataset:
    """A shallow copy of ``dataset`` (through its subsets) whose base dataset applies
    ``transform``: the same samples and indices, another view of them."""
    if hasattr(dataset, "indices") and hasattr(dataset, "dataset"):
        view = copy.copy(dataset)
        view.dataset = with_transform(dataset.dataset, transform)
        return view
    view = copy.copy(dataset)
    view.transform = transform
    return view


def dataset_identity(dataset: Dataset) -> list[Any]:
    """What identifies a dataset's samples and their order: the subset indices of every
    :class:`~cskd.data.SubsetDataset` around it and the base dataset's ``identity()``."""
    parts: list[Any] = []
    while hasattr(dataset, "indices") and hasattr(dataset, "dataset"):
        parts.append(["subset", dataset.indices.tolist()])
        dataset = dataset.dataset
    if not hasattr(dataset, "identity"):
        raise CacheError(
            f"{type(dataset).__name__} cannot say which images it holds, so a teacher cache "
            "cannot be checked against it: give it an identity() method (docs/design.md, "
            "'Where to add')"
        )
    parts.append([type(dataset).__name__, dataset.identity()])
    return parts


def data_digest(dataset: Dataset) -> str:
    """SHA-256 (hex) of :func:`dataset_identity`: equal for the same images in the same order."""
    return hashlib.sha256(json.dumps(dataset_identity(dataset)).encode()).hexdigest()


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of a state dict's tensors: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def shard_ranges(size: int, shard_size: int) -> list[range]:
    """The image indices of each shard: ``[0, s), [s, 2s), ...`` (the last may be shorter)."""
    return [range(start, min(start + shard_size, size)) for start in range(0, size, shard_size)]


def write_shard(directory: Path, shard: int, arrays: dict[str, np.ndarray]) -> dict:
    """Write one shard's arrays (``logits`` or ``values`` + ``indices``, and ``sizes``), each
    atomically, then its record ``shard-NNNNN.json`` (last: a shard without it is unfinished)."""
    files = {}
    for key, array in arrays.items():
        path = directory / f"{shard_name(shard)}-{key}.npy"
        atomic_write(path, lambda file, array=array: np.save(file, array, allow_pickle=False))
        files[path.name] = file_sha256(path)
    record = {"shard": shard, "images": int(arrays["sizes"].shape[0]), "files": files}
    atomic_write(
        directory / f"{shard_name(shard)}.json",
        lambda file: file.write(json.dumps(record, indent=1).encode()),
    )
    return record


def finished_shard(directory: Path, shard: int, *, images: int) -> dict | None:
    """The record of a shard already written and intact (its files' digests match), else None."""
    path = directory / f"{shard_name(shard)}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("images") != images:
        return None
    for name, digest in record.get("files", {}).items():
        file = directory / name
        if not file.is_file() or file_sha256(file) != digest:
            return None
    return record


def write_header(directory: Path, header: dict) -> None:
    text = json.dumps({"format": FORMAT, "version": VERSION, **header}, indent=1)
    atomic_write(directory / HEADER, lambda file: file.write(text.encode()))


def read_header(directory: str | os.PathLike) -> dict:
    """The header of the cache in ``directory``; CacheError if it is not a finished cache."""
    directory = Path(directory)
    path = directory / HEADER
    if not directory.is_dir():
        raise CacheError(
            f"teacher.cache={directory} is not a directory: build it with "
            "`cskd cache --config <recipe>` (with teacher.cache set to that path)"
        )
    if not path.is_file():
        raise CacheError(
            f"teacher cache {directory} is unfinished or not a cache ({HEADER} missing): rerun "
            "`cskd cache` with the same recipe to complete it"
        )
    try:
        header = json.loads(path.read_text())
    except ValueError as error:
        raise CacheError(f"teacher cache header {path} is damaged ({error}): rebuild it") from None
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise CacheError(
            f"{path} is not a version-{VERSION} {FORMAT} (format {header.get('format')!r}, "
            f"version {header.get('version')!r}): rebuild it with this version's `cskd cache`"
        )
    return header


def check_header(header: dict, expected: dict, *, path: str | os.PathLike) -> None:
    """CacheError naming the first of :data:`MUST_MATCH` where ``header`` and ``expected``
    (what this run would write) differ, and the fix."""
    for key in MUST_MATCH:
        if header.get(key) != expected.get(key):
            raise CacheError(
                f"teacher cache {path} was made with another {key.replace('_', ' ')} "
                f"({_short(header.get(key))}, this run: {_short(expected.get(key))}; set by "
                f"{CONFIG_KEYS[key]}): rebuild it with `cskd cache` for this recipe, or point "
                "teacher.cache at a new directory"
            )


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] + "..." if isinstance(value, str) and len(text) > 16 else text


@dataclass
class TeacherCache:
    """A finished cache, memory-mapped: :meth:`maps` gathers the stored maps of a batch.

    ``header`` is the cache's ``cache.json``. Nothing is read into memory until asked for, so a
    cache larger than memory (ImageNet) stays on disk and the page cache serves it.
    """

    path: Path
    header: dict
    shards: list[dict[str, np.ndarray]]

    @property
    def num_classes(self) -> int:
        return int(self.header["num_classes"])

    @property
    def size(self) -> int:
        return int(self.header["images"])

    def rows(self, indices: torch.Tensor) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Per shard touched: (shard, positions in ``indices``, rows in the shard)."""
        shard_size = int(self.header["shard_size"])
        indices = indices.cpu().numpy().astype(np.int64)
        outside = indices[(indices < 0) | (indices >= self.size)]
        if outside.size:
            raise CacheError(
                f"teacher cache {self.path} holds {self.size} images but index "
                f"{int(outside[0])} was asked: it was made for another training set"
            )
        shards = indices // shard_size
        for shard in np.unique(shards):
            positions = np.nonzero(shards == shard)[0]
            yield int(shard), positions, indices[positions] - shard * shard_size

    def maps(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dense logits (N, K, Hc, Wc) float32, original sizes (N, 2) as (height, width))``
        for the training images ``indices`` (N,). Top-k caches fill each cell's classes outside
        its k with the smallest stored logit of the cell (they can then never be its argmax)."""
        grid = self.header["map_grid"]
        count = int(indices.shape[0])
        dense = torch.empty(count, self.num_classes, grid[0], grid[1], dtype=torch.float32)
        sizes = torch.empty(count, 2, dtype=torch.float32)
        for shard, positions, rows in self.rows(indices):
            arrays = self.shards[shard]
            where = torch.from_numpy(positions)
            sizes[where] = torch.from_numpy(arrays["sizes"][rows].astype(np.float32))
            if "logits" in arrays:
                dense[where] = torch.from_numpy(arrays["logits"][rows].astype(np.float32))
                continue
            values = torch.from_numpy(arrays["values"][rows].astype(np.float32))  # (n, k, h, w)
            classes = torch.from_numpy(arrays["indices"][rows].astype(np.int64))
            filled = values[:, -1:].expand(-1, self.num_classes, -1, -1).clone()
            dense[where] = filled.scatter_(1, classes, values)
        return dense, sizes


def open_cache(path: str | os.PathLike, *, expected: dict | None = None) -> TeacherCache:
    """Open and verify the finished cache at ``path``: header (against ``expected``, see
    :func:`check_header`), every shard's files present, of the recorded SHA-256, shapes and
    dtypes as the header says. Raises :class:`CacheError` naming what is wrong."""
    directory = Path(path)
    header = read_header(directory)
    if expected is not None:
        check_header(header, expected, path=directory)
    ranges = shard_ranges(int(header["images"]), int(header["shard_size"]))
    if len(header.get("shards", [])) != len(ranges):
        raise CacheError(f"teacher cache {directory}: the header lists the wrong shards: rebuild")
    shards = []
    classes, grid, topk = int(header["num_classes"]), header["map_grid"], int(header["topk"])
    width = topk or classes
    for shard, (record, images) in enumerate(zip(header["shards"], ranges, strict=True)):
        arrays = {}
        for name, digest in record["files"].items():
            file = directory / name
            if not file.is_file():
                raise CacheError(
                    f"teacher cache {directory} is incomplete: {name} is missing (rerun `cskd "
                    "cache` with the same recipe to rebuild the missing shards)"
                )
            if file_sha256(file) != digest:
                raise CacheError(
                    f"teacher cache file {file} is damaged or truncated (its SHA-256 is not the "
                    "recorded one): delete it and rerun `cskd cache` to rebuild that shard"
                )
            key = name.removeprefix(shard_name(shard) + "-").removesuffix(".npy")
            arrays[key] = np.load(file, mmap_mode="r", allow_pickle=False)
        expected_shapes = {"sizes": (len(images), 2)}
        for key in ("logits",) if not topk else ("values", "indices"):
            expected_shapes[key] = (len(images), width, grid[0], grid[1])
        for key, shape in expected_shapes.items():
            if key not in arrays or tuple(arrays[key].shape) != shape:
                found = tuple(arrays[key].shape) if key in arrays else "missing"
                raise CacheError(
                    f"teacher cache {directory}: {shard_name(shard)} {key} is {found}, the header "
                    f"says {shape}: rebuild the cache"
                )
        stored = arrays["logits" if not topk else "values"]
        if not np.isfinite(stored).all():  # read once anyway, for its digest
            file = directory / f"{shard_name(shard)}-{'logits' if not topk else 'values'}.npy"
            raise CacheError(
                f"teacher cache file {file} holds logits that are not finite (NaN or inf): its "
                "teacher diverged or overflowed float16; rebuild the cache from a sound teacher "
                "(teacher.cache_dtype=float32 if it overflowed)"
            )
        shards.append(arrays)
    return TeacherCache(path=directory, header=header, shards=shards)
