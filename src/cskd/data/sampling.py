"""Which sample each step sees, and with which random augmentation — reproducibly.

Every training sample is drawn as ``(index, seed)``: the sampler fixes the order of an epoch
(shuffled, sharded over ranks, optionally with repeated augmentation) and gives each position its
own seed, derived from (run seed, epoch, rank, position). ``SeededSamples`` runs the dataset's
random transform under that seed. Augmentations therefore depend neither on the number of loader
workers nor on where a run was interrupted: resuming at step k of an epoch skips k batches of the
same order and reproduces the same crops, flips and RandAugment choices.
"""

from __future__ import annotations

import atexit
import multiprocessing
import random
import signal
from collections.abc import Iterator

import numpy as np
import torch
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..errors import USER_ERRORS, DataError


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """A 63-bit seed for one sample of one epoch on one rank (stable across runs and versions)."""
    mixed = np.random.SeedSequence([seed, epoch, rank, position]).generate_state(2, dtype=np.uint32)
    return int(mixed[0]) << 31 | int(mixed[1]) >> 1


class SeededSamples(Dataset):
    """Wraps a dataset so that ``dataset[(index, seed)]`` runs its transform under ``seed``.

    The global ``random``, NumPy and torch (CPU) generators are restored afterwards, so the main
    process's own randomness (Mixup, dropout) is untouched when there are no loader workers.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed also seeds CUDA, which on a CUDA build
            # without an initialised GPU records a traceback per call (0.8 ms, half the cost
            # of a Fashion-MNIST sample); transforms draw from the CPU generator alone
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)


class EpochSampler(Sampler):
    """Yields ``(index, seed)`` for one rank's share of an epoch, from position ``start`` on.

    ``repeats > 1`` uses timm's repeated-augmentation sampler (each image appears ``repeats``
    times in a row of the order, so its copies land on different ranks; an epoch is still about
    one dataset's worth of samples over all ranks, so about 1 / ``repeats`` of the images).
    Otherwise a shuffled ``DistributedSampler`` (drop_last), which also serves one process: an
    epoch covers the dataset once, each rank a disjoint 1 / W of it.

    Both deal one epoch order, which does not depend on the world size, round-robin: rank r takes
    positions r, r + W, r + 2W, ... (see :func:`resume_step`).
    """

    def __init__(
        self, dataset: Dataset, *, seed: int, rank: int, world_size: int, repeats: int = 1
    ) -> None:
        self.seed, self.rank, self.epoch, self.start = seed, rank, 0, 0
        if repeats > 1:
            self.order = RepeatAugSampler(
                dataset, num_replicas=world_size, rank=rank, shuffle=True, num_repeats=repeats
            )
        else:
            self.order = DistributedSampler(
                dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
            )

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order (epoch-seeded) and skip its first ``start`` samples."""
        self.epoch, self.start = epoch, start
        self.order.set_epoch(
            epoch if isinstance(self.order, DistributedSampler) else epoch + self.seed
        )

    def __len__(self) -> int:
        return len(self.order) - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self.order):
            if position >= self.start:
                yield index, sample_seed(self.seed, self.epoch, self.rank, position)


def resume_step(step_in_epoch: int, *, saved_global_batch: int, global_batch: int) -> int:
    """The step of the interrupted epoch to resume at when the global batch has changed.

    After k steps of global batch G, the ranks together have consumed the first k x G positions of
    the epoch's order, whatever the world size was (the order is shared and dealt round-robin).
    With global batch G' the epoch resumes at step floor(k x G / G'): no sample of the epoch is
    skipped, and at most G' - 1 are seen twice.
    """
    return step_in_epoch * saved_global_batch // global_batch


class ShardSampler(Sampler):
    """Rank r takes indices r, r + W, r + 2W, ...: every image counted exactly once, no padding."""

    def __init__(self, size: int, *, rank: int, world_size: int) -> None:
        self.indices = range(rank, size, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def _ignore_termination(worker_id: int = 0) -> None:
    """Loader workers ignore the stop signals (SIGTERM, Ctrl-C, SIGUSR1, SIGHUP): a scheduler
    (or the terminal) signals the whole process group, and a worker dying would crash the main
    process before it saves (``training.run.StopRequest``); the main process ends its workers
    itself."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def kill_loader_workers() -> None:
    """At exit, SIGKILL the daemonic child processes still alive (the loader workers; the
    interpreter would end them anyway): they ignore SIGTERM, so its own clean-up (SIGTERM, then
    wait) would wait forever when a run ends on an error that left a loader unclosed."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # PyTorch's handler would raise here
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=10)


atexit.register(kill_loader_workers)  # runs before multiprocessing's (registered earlier)


def worker_failure(error: BaseException) -> Exception | None:
    """The one-line error for a failure inside a loader worker, or None for any other error.

    A worker that died (the kernel's OOM killer, a segfault in a decoder) becomes a
    :class:`~cskd.errors.DataError` that says what it usually means and how to go on; a user
    error raised in a worker (a corrupt image) keeps its type and its own message, without the
    worker's traceback that PyTorch puts in front of it."""
    text = str(error)
    reason = None
    if isinstance(error, RuntimeError) and text.startswith("DataLoader worker ("):
        reason = text.splitlines()[0].split(". ")[0].rstrip(".")
    elif isinstance(error, EOFError | ConnectionError) and _raised_by_a_loader(error):
        reason = f"its connection closed mid-batch: {type(error).__name__}"  # killed mid-send
    if reason is not None:
        return DataError(
            f"a data-loading worker died ({reason}): this usually means the machine ran out of "
            "memory - lower data.workers or data.batch_size; last.pt holds the run up to its "
            "last checkpoint (resume it with train.resume=auto)"
        )
    if isinstance(error, USER_ERRORS) and " in DataLoader worker process " in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        return type(error)(last.split(": ", 1)[1] if ": " in last else last)
    return None


def _raised_by_a_loader(error: BaseException) -> bool:
    frame = error.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_filename.endswith("torch/utils/data/dataloader.py"):
            return True
        frame = frame.tb_next
    return False


def _worker_init(worker_id: int) -> None:
    _ignore_termination()
    # Samples are seeded one by one; this only keeps stray global RNG use distinct per worker.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def train_loader(
    dataset: Dataset,
    sampler: EpochSampler,
    *,
    batch_size: int,
    workers: int,
    pin_memory: bool,
    prefetch_factor: int = 2,
) -> DataLoader:
    """A loader over the sampler's epochs: iterate it again after ``sampler.set_epoch`` (the
    sampler is read in the main process at each new iteration). Its workers persist across
    epochs (no start-up per epoch) and each keeps ``prefetch_factor`` batches ready; pinned
    memory on a GPU. Samples are seeded one by one (:class:`SeededSamples`), so neither the
    workers' own seeds nor their lifetime change a sample.

    The loader draws its worker seeds from its own generator, never from the global torch RNG,
    so creating it (at the start, or after a resume) leaves the training RNG untouched.
    """
    loader_slot = 2**32 - 1  # a position no sample reaches
    generator = torch.Generator().manual_seed(
        sample_seed(sampler.seed, sampler.epoch, sampler.rank, loader_slot)
    )
    return DataLoader(
        SeededSamples(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=True,
        worker_init_fn=_worker_init,
        persistent_workers=workers > 0,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        generator=generator,
    )


def eval_loader(
    dataset: Dataset, *, batch_size: int, workers: int, rank: int, world_size: int, pin_memory: bool
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank=rank, world_size=world_size),
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=False,
        worker_init_fn=_ignore_termination,
    )
