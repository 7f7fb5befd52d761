"""What several benchmarks share: the machine's description and an in-memory teacher cache."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from cskd.teacher.store import TeacherCache


def cpu_model() -> str:
    """The CPU's model name (for benchmark reports)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_cache(
    logits: torch.Tensor, sizes: torch.Tensor, *, train_grid: tuple[int, int]
) -> TeacherCache:
    """An in-memory cache of every logit: ``logits`` (N, K, Hc, Wc) of images ``0..N-1`` whose
    originals are ``sizes`` (N, 2) = (height, width) pixels; ``train_grid`` the teacher's map
    size at the training image size (what :func:`cskd.teacher.store.open_cache` gives for a
    cache on disk, without its header's provenance)."""
    header = {
        "num_classes": logits.shape[1],
        "images": logits.shape[0],
        "shard_size": max(logits.shape[0], 1),
        "map_grid": list(logits.shape[-2:]),
        "train_grid": list(train_grid),
        "topk": 0,
    }
    shard = {"logits": logits.detach().cpu().numpy(), "sizes": sizes.cpu().numpy()}
    return TeacherCache(path=Path("<memory>"), header=header, shards=[shard])
