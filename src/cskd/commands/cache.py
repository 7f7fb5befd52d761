"""``cskd cache``: run the frozen teacher once over the training set and store its dense logits.

``build_cache(config)`` writes the cache at ``teacher.cache`` (format: :mod:`cskd.teacher.store`):
every training image, whole, resized to ``teacher.cache_size`` pixels, through the teacher of the
recipe. Shards are split over ranks under torchrun (rank r builds shards r, r + W, ...), finished
shards are skipped when the command is run again (a killed build resumes), and rank 0 writes the
header once every shard is on disk. Training reads it through
:func:`cskd.teacher.cached.open_cached_teacher`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import Config
from ..data import build_datasets
from ..errors import CacheError, ConfigError
from ..infra import distributed
from ..infra.checkpoint import atomic_write, is_atomic_temporary
from ..infra.runlog import setup_logging
from ..teacher.cached import run_expectations
from ..teacher.store import (
    CONFIG_KEYS,
    HEADER,
    FullImageTransform,
    finished_shard,
    shard_name,
    shard_ranges,
    with_transform,
    write_header,
    write_shard,
)
from ..training import preflight
from ..training.models import build_teacher, place_teacher

log = logging.getLogger("cskd")
SETTINGS = "build.json"  # the header's settings, written before the first shard


def build_cache(config: Config) -> Path:
    """Build (or complete) the cache at ``teacher.cache``; returns its directory."""
    if not config.teacher.cache:
        raise ConfigError("cskd cache needs teacher.cache=DIR: the directory to write the cache to")
    info = distributed.init_distributed(
        device=config.train.device,
        backend=config.train.dist_backend,
        timeout_s=config.train.dist_timeout_s,
    )
    try:
        return _build(config, info)
    finally:
        distributed.shutdown()


def _build(config: Config, info: distributed.DistributedInfo) -> Path:
    setup_logging(rank=info.rank)
    preflight.check_models(config)
    distributed.together(preflight.check_data_source, config.data)
    train_set, _ = distributed.together(build_datasets, config.data, config.augment)
    teacher = distributed.together(build_teacher, config, method="cskd")
    teacher = place_teacher(config, teacher, info.device)  # precision, memory format, compile
    size = config.teacher.cache_size or config.data.image_size
    topk = config.teacher.cache_topk
    if topk >= config.data.num_classes:
        raise ConfigError(
            f"teacher.cache_topk={topk} keeps every one of the {config.data.num_classes} classes: "
            "use teacher.cache_topk=0 (store all) or a smaller k"
        )
    settings = {
        **run_expectations(config, teacher=teacher, train_set=train_set),
        "images": len(train_set),
        "cache_size": size,
        "map_grid": list(teacher.grid(size)),
        "train_grid": list(teacher.grid(config.data.image_size)),
        "topk": topk,
        "dtype": config.teacher.cache_dtype,
        "shard_size": config.teacher.cache_shard_size,
        # the teacher's batch: float arithmetic may differ in the last bits between batch
        # sizes, so it is fixed, and batches start at its multiples within each shard
        "batch": config.data.eval_batch_size or 2 * config.data.batch_size,
        "interpolation": config.augment.interpolation,
        "teacher_kwargs": config.teacher.kwargs,
        "teacher_precision": str(teacher.amp_dtype).removeprefix("torch."),
        "stored_per_image": "the teacher's dense logits of the whole image at cache_size px "
        "(no crop, flip or RandAugment), and the image's original height and width",
    }
    directory = Path(config.teacher.cache)
    # every rank checks before rank 0 writes anything into the directory (its temporary file
    # would otherwise make a slower rank see a non-empty directory that holds no cache)
    settings, complete = distributed.together(_check_directory, directory, settings)
    distributed.together(_claim_directory, directory, settings, is_main=info.is_main)
    if complete:
        log.info(f"cache {directory}: already complete, nothing to do")
        return directory

    view = with_transform(
        train_set, FullImageTransform(size=size, interpolation=config.augment.interpolation)
    )
    ranges = shard_ranges(len(train_set), config.teacher.cache_shard_size)
    mine = [s for s in range(len(ranges)) if s % info.world_size == info.rank]
    todo = [s for s in mine if finished_shard(directory, s, images=len(ranges[s])) is None]
    log.info(
        f"cache {directory}: {len(train_set)} images in {len(ranges)} shards of "
        f"{config.teacher.cache_shard_size}, teacher map {settings['map_grid']} at {size} px "
        f"({settings['train_grid']} at the training size); {len(mine) - len(todo)} of this "
        f"rank's {len(mine)} shards already done"
    )
    start = time.perf_counter()
    # agreed by all ranks: a failure on one (a corrupt image) stops them all, and it is the
    # barrier after which every rank's shards are on disk
    distributed.together(
        _write_shards, teacher, view, config, settings, shards=todo, directory=directory, info=info
    )
    distributed.together(_finish, directory, settings, is_main=info.is_main)
    log.info(f"cache {directory}: complete ({time.perf_counter() - start:.1f} s on this rank)")
    return directory


def _write_shards(
    teacher, view, config: Config, settings: dict, *, shards: list[int], directory: Path, info
) -> None:
    """Run the teacher over this rank's unfinished ``shards`` of ``view`` and write them."""
    ranges = shard_ranges(settings["images"], settings["shard_size"])
    bar = tqdm(
        total=sum(len(ranges[s]) for s in shards),
        desc="cache",
        unit="img",
        disable=not (info.is_main and sys.stderr.isatty()),
        file=sys.stderr,
    )
    # one loader for all of this rank's shards (workers start once); its batches never cross a
    # shard and start at multiples of the recorded batch within each shard
    batches = [
        list(ranges[shard])[start : start + settings["batch"]]
        for shard in shards
        for start in range(0, len(ranges[shard]), settings["batch"])
    ]
    loader = DataLoader(
        view,
        batch_sampler=batches,
        num_workers=config.data.workers,
        pin_memory=info.device.type == "cuda",
        prefetch_factor=config.data.prefetch_factor if config.data.workers else None,
    )
    pending = iter(shards)
    shard = next(pending, None)
    logits, sizes, done = [], [], 0
    for batch in loader:
        images = teacher.normalize(batch["image"].to(info.device, non_blocking=True))
        logits.append(teacher(images).dense_logits.float().cpu())  # (n, K, Hc, Wc)
        sizes.append(batch["crop"][:, 2:].round().to(torch.int32))  # (n, 2) height, width
        bar.update(len(images))
        done += len(images)
        if done == len(ranges[shard]):
            write_shard(directory, shard, _stored(torch.cat(logits), torch.cat(sizes), settings))
            if bar.disable:
                log.info(
                    f"cache {directory}: {shard_name(shard)} written ({len(ranges[shard])} images)"
                )
            shard, logits, sizes, done = next(pending, None), [], [], 0
    bar.close()


def _stored(logits: torch.Tensor, sizes: torch.Tensor, settings: dict) -> dict[str, np.ndarray]:
    """The shard's arrays in the cache's storage: every logit, or the top-k values and classes."""
    dtype = np.float16 if settings["dtype"] == "float16" else np.float32
    arrays = {"sizes": sizes.numpy()}
    if not settings["topk"]:
        arrays["logits"] = logits.numpy().astype(dtype)
        return arrays
    values, classes = logits.topk(settings["topk"], dim=1)  # (n, k, Hc, Wc), sorted descending
    index_dtype = np.int16 if settings["num_classes"] <= np.iinfo(np.int16).max else np.int32
    arrays["values"] = values.numpy().astype(dtype)
    arrays["indices"] = classes.numpy().astype(index_dtype)
    return arrays


def _check_directory(directory: Path, settings: dict) -> tuple[dict, bool]:
    """Check ``directory`` for a build with ``settings``; returns the settings to build with (a
    started cache keeps its teacher batch) and whether it is complete. Writes nothing.

    Refused in one line: a directory of a cache with other settings, and a non-empty directory
    that is not a cache. A damaged header is rewritten from the recorded settings."""
    draft, header = directory / SETTINGS, directory / HEADER
    recorded = _read_json(draft) or _read_json(header)
    # a killed write's temporaries do not make a directory a non-cache (they are removed)
    kept = (
        [p for p in directory.iterdir() if not is_atomic_temporary(p)] if directory.is_dir() else []
    )
    if recorded is None and kept:
        raise CacheError(
            f"teacher.cache={directory} is a non-empty directory that holds no cache: point "
            "teacher.cache at a new or empty directory"
        )
    if recorded is not None:
        settings = {**settings, "batch": recorded.get("batch", settings["batch"])}
        differing = [k for k, v in settings.items() if recorded.get(k) != v]
        if differing:
            keys = ", ".join(sorted({CONFIG_KEYS.get(k, k) for k in differing}))
            raise CacheError(
                f"teacher.cache={directory} holds a cache built with other settings ({keys} "
                "differ): choose another teacher.cache, or delete the directory to rebuild it"
            )
    complete = _read_json(header) is not None and _complete(directory, settings)
    return settings, complete


def _claim_directory(directory: Path, settings: dict, *, is_main: bool) -> None:
    """Rank 0: create ``directory``, remove a killed build's temporaries, record ``settings``."""
    if not is_main:
        return
    directory.mkdir(parents=True, exist_ok=True)
    for stale in filter(is_atomic_temporary, directory.iterdir()):  # writes a kill interrupted
        stale.unlink(missing_ok=True)
    draft = directory / SETTINGS
    if _read_json(draft) is None:
        text = json.dumps(settings, indent=1).encode()
        atomic_write(draft, lambda file: file.write(text))


def _read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when it is missing or damaged."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _complete(directory: Path, settings: dict) -> bool:
    ranges = shard_ranges(settings["images"], settings["shard_size"])
    return all(finished_shard(directory, s, images=len(r)) for s, r in enumerate(ranges))


def _finish(directory: Path, settings: dict, *, is_main: bool) -> None:
    """Rank 0: write the header once every shard is on disk (the other ranks' included)."""
    if not is_main:
        return
    ranges = shard_ranges(settings["images"], settings["shard_size"])
    records = [finished_shard(directory, s, images=len(r)) for s, r in enumerate(ranges)]
    missing = [shard_name(s) for s, record in enumerate(records) if record is None]
    if missing:
        raise CacheError(
            f"teacher cache {directory}: {', '.join(missing[:3])} missing after the build (is "
            "the directory on a filesystem every rank shares?): rerun `cskd cache`"
        )
    write_header(directory, {**settings, "shards": records})
