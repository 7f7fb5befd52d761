"""The run directory: what a run writes there (its manifest), which directories may hold a run,
and an overwrite that deletes the previous run's own files only, once every input is read.

A run writes the names in :data:`RUN_FILES` and nothing else (a test runs a run and checks it).
``train.overwrite=true`` therefore deletes exactly those names, never following a link, and
leaves every other file in the directory where it is. It deletes them only when
:meth:`RunDirectory.clear_previous` is called, after the datasets, the models, the teacher and
its cache have been read: a run that fails on an input before then leaves the previous run as
it was. An output directory that is empty (the current directory), or that is or holds one of
the run's inputs, is refused before anything is created (:func:`check_output_dir`).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, TrainConfig
from ..errors import ConfigError
from ..infra import distributed
from ..infra.checkpoint import remove_stale_temporaries
from ..infra.runlock import LOCK_NAME, RunLock

log = logging.getLogger("cskd")

RESULTS = ("last.pt", "best.pt", "student.safetensors", "final_metrics.json")  # a run's results
# every name a run (and `cskd diagnose` on it) writes in its directory: what an overwrite deletes
RUN_FILES = (
    *RESULTS,
    "student_ema.safetensors",
    "config.yaml",
    "metrics.jsonl",
    "train.log",
    "tensorboard",
    "diagnostics",
    LOCK_NAME,
)


def run_inputs(config: Config) -> dict[str, Path]:
    """The run's inputs that live in files or folders, by config key (those that are set; the
    teacher's only when the method uses a teacher)."""
    paths = {"student.checkpoint": config.student.checkpoint}
    if config.distill.method != "none":
        paths |= {
            "teacher.checkpoint": config.teacher.checkpoint,
            "teacher.cache": config.teacher.cache,
        }
    if config.data.dataset == "folder":
        paths["data.root"] = config.data.root
    return {key: Path(value) for key, value in paths.items() if value}


def check_output_dir(config: Config) -> None:
    """Refuse an empty ``train.output_dir`` (it would be the current directory), one that is or
    holds an input (teacher weights, its cache, initial weights, the image folder: an overwrite
    or a later run could delete them), and one inside a folder dataset's root (its files would
    be read as images). Raises :class:`ConfigError` naming both keys."""
    if not str(config.train.output_dir).strip():
        raise ConfigError(
            "train.output_dir is empty: name a directory for the run (runs/<name>), not the "
            "current directory"
        )
    output = Path(config.train.output_dir).resolve()
    for key, value in run_inputs(config).items():
        path = value.resolve()
        if path == output or output in path.parents:
            raise ConfigError(
                f"train.output_dir {config.train.output_dir} holds {key} {value}: a run "
                "directory may hold only the run's own files; choose another train.output_dir"
            )
        if key == "data.root" and path in output.parents:
            raise ConfigError(
                f"train.output_dir {config.train.output_dir} is inside data.root {value}, whose "
                "folders are read as classes of images: choose a train.output_dir outside it"
            )


@dataclass
class RunDirectory:
    """A claimed run directory. ``replaces``: it holds a previous run that this one overwrites
    once its inputs are read (:meth:`clear_previous`); ``log_start``: the size ``train.log`` had
    when this run claimed the directory (its own lines follow)."""

    path: Path
    replaces: bool = False
    log_start: int = 0
    created: bool = False  # this run made the directory
    lock: RunLock | None = None  # rank 0's

    def abandon(self) -> None:
        """A run that fails or is stopped before saving anything: release the lock and remove
        the directory if this run made it and it holds no results (nothing left behind)."""
        if self.lock is None:
            return
        self.lock.release()
        if self.created and not any((self.path / name).exists() for name in RESULTS):
            shutil.rmtree(self.path, ignore_errors=True)

    def clear_previous(self, *, is_main: bool) -> None:
        """Delete the previous run's files (the names of :data:`RUN_FILES`, a link as a link)
        and its lines in ``train.log``, keeping this run's; a no-op unless overwriting."""
        if not (self.replaces and is_main):
            return
        for name in RUN_FILES:
            entry = self.path / name
            if name in (LOCK_NAME, "train.log") or not (entry.exists() or entry.is_symlink()):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        log_file = self.path / "train.log"
        if log_file.is_file() and not log_file.is_symlink():
            with open(log_file, "r+b") as file:  # the logger appends: cut the previous part
                file.seek(self.log_start)
                own = file.read()
                file.seek(0)
                file.write(own)
                file.truncate()
        log.info(f"overwrote the previous run in {self.path} (its own files only)")
        self.replaces = False


def prepare_run_dir(
    train: TrainConfig, *, is_main: bool, lock: RunLock | None = None
) -> RunDirectory:
    """Create the run directory and take its ``lock`` (rank 0); refuse a directory that holds
    another run unless resuming or overwriting, one a live run is writing, and an output path
    that cannot be a directory. Overwriting deletes nothing yet
    (:meth:`RunDirectory.clear_previous`). Taking over a dead run's lock is said on stderr and
    appended to the directory's ``train.log``."""
    run_dir = Path(train.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(
            f"train.output_dir {run_dir} is a file, not a directory: choose another "
            "train.output_dir"
        )
    # a run that never reached a checkpoint (died at step 1, say) holds nothing to lose
    holds_run = any((run_dir / name).exists() for name in RESULTS)
    if holds_run and not train.resume and not train.overwrite:
        raise ConfigError(
            f"train.output_dir {run_dir} already holds a run: pass train.resume=auto to continue "
            "it, train.overwrite=true to replace it, or choose another train.output_dir"
        )
    claimed = RunDirectory(run_dir, replaces=holds_run and train.overwrite and not train.resume)
    if is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # read-only, no permission, a file on the path
            raise ConfigError(
                f"cannot create train.output_dir {run_dir} ({error.strerror}): choose a "
                "directory you can write to"
            ) from None
        if lock is not None:
            lock.acquire()
        remove_stale_temporaries(run_dir)  # of checkpoint writes a kill interrupted
        log_file = run_dir / "train.log"
        claimed.log_start = log_file.stat().st_size if log_file.is_file() else 0
        if lock is not None and lock.taken_over:  # said before train.log is attached: keep it
            with open(log_file, "a") as file:
                file.write(f"{time.strftime('%H:%M:%S')} {lock.taken_over}\n")
    return claimed


@contextmanager
def claimed_run_dir(train: TrainConfig, *, is_main: bool) -> Iterator[RunDirectory]:
    """The run directory (:func:`prepare_run_dir`), locked for this run while the block runs
    (:class:`~cskd.infra.runlock.RunLock`, rank 0). A run that fails before saving anything
    removes the directory it created, so a failed command leaves nothing behind."""
    run_dir = Path(train.output_dir)
    created = not run_dir.exists()
    lock = RunLock(run_dir) if is_main else None
    claimed = distributed.together(prepare_run_dir, train, is_main=is_main, lock=lock)
    claimed.created, claimed.lock = created, lock
    try:
        yield claimed
    except BaseException:
        claimed.abandon()
        raise
    finally:
        if lock is not None:
            lock.release()
