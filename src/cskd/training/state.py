"""A run's saved state: checkpoint contents, random streams and resume (the run directory:
:mod:`cskd.training.rundir`)."""

from __future__ import annotations

import io
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import Config, TrainConfig, to_dict
from ..data.sampling import resume_step, sample_seed
from ..errors import CheckpointError, ConfigError, NonFiniteError
from ..infra import distributed
from ..infra.checkpoint import read_file, save_atomic
from ..infra.runlog import truncate_after
from ..infra.weights import non_finite
from . import preflight
from .build import seed_everything

log = logging.getLogger("cskd")

CHECKPOINT_KEYS = ("student", "optimizer", "scheduler", "state", "rng", "config")


def rng_state() -> dict:
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def every_ranks_rng_state() -> list[dict]:
    """:func:`rng_state` of every rank, in rank order, on every rank (a collective). Gathered
    as ``torch.save`` bytes: the states hold tensors that object collectives do not pickle."""
    if not torch.distributed.is_initialized():
        return [rng_state()]
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    gathered = distributed.gather_objects(buffer.getvalue())
    return [torch.load(io.BytesIO(blob), weights_only=True) for blob in gathered]


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_state(
    config: Config,
    *,
    student: torch.nn.Module,
    ema,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler | None,
    state: TrainState,
    global_batch: int,
    steps_per_epoch: int,
    class_names: list[str],
    random_streams: list[dict] | None = None,
    teacher_digest: str | None = None,
) -> dict:
    """What ``last.pt`` / ``best.pt`` hold: weights (raw and EMA), optimizer, scheduler and
    scaler state, the run's position (:class:`TrainState`), every rank's random streams
    (``rng``: rank 0's; ``rng_ranks``: all, in rank order), the global batch, the config, the
    training classes in label order (``cskd eval`` refuses data with other names), and the
    teacher's name, path and weights digest (never its weights: a resume refuses a teacher
    file that changed)."""
    return {
        "student": student.state_dict(),
        "ema": ema.module.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "state": {
            "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch,
            "global_step": state.global_step,
            "best_metric": state.best_metric,
            "best": state.best,
            "epoch_sums": dict(state.epoch_sums),
            "epoch_steps": state.epoch_steps,
        },
        "rng": random_streams[0] if random_streams else rng_state(),  # rank 0's
        "rng_ranks": random_streams or [rng_state()],
        "global_batch": global_batch,  # state.step_in_epoch counts steps of this many images
        "steps_per_epoch": steps_per_epoch,
        "config": to_dict(config),
        "class_names": list(class_names),
        "teacher": {
            "name": config.teacher.name,
            "checkpoint": config.teacher.checkpoint,
            "pretrained_tag": config.teacher.pretrained_tag,
            "weights_sha256": teacher_digest,
        },
    }


@dataclass
class Checkpoints:
    """Writes the run's ``last.pt`` / ``best.pt`` (:func:`checkpoint_state` of these objects,
    atomically; rank 0 only): what the epoch loop saves, and from what."""

    config: Config
    run_dir: Path
    is_main: bool
    student: torch.nn.Module
    ema: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler | None
    state: TrainState
    global_batch: int
    steps_per_epoch: int
    class_names: list[str]
    teacher_digest: str | None = None  # tensors_digest of the teacher's weights

    def __post_init__(self) -> None:
        # what each checkpoint file holds, as a global step: a resumed run's last.pt holds where
        # it resumed from; said when the run stops on a fault (:meth:`intact`)
        self.saved: dict[str, int] = {}
        if (self.run_dir / "last.pt").is_file():
            self.saved["last.pt"] = self.state.global_step

    def intact(self) -> str:
        """Which checkpoint holds the run, for the line of a run stopped by a fault: whether
        ``last.pt`` holds the very weights that failed (saved at the current step), and where
        ``best.pt`` stands."""
        if "last.pt" not in self.saved:
            return "no checkpoint was written (nothing of this run is saved)"
        step = self.saved["last.pt"]
        held = f"{self.run_dir / 'last.pt'} holds step {step}"
        if step == self.state.global_step:
            held += (
                ", the weights that failed: resuming from it repeats this unless optim.lr is "
                "lowered"
            )
        else:
            held += ", untouched since (train.resume=auto continues from it)"
        if "best.pt" in self.saved:
            held += f"; best.pt holds step {self.saved['best.pt']}"
        return held

    def save(self, name: str) -> None:
        """Write ``name`` (rank 0, with every rank's random streams: a collective, so every rank
        calls it at the same step); :class:`NonFiniteError` on every rank instead, before
        anything is written, when a weight of the student or its EMA is NaN or infinite."""
        random_streams = every_ranks_rng_state()
        weights = [self.student.state_dict()]
        if self.ema is not None:
            weights.append(self.ema.module.state_dict())
        if any(non_finite(state) for state in weights):
            raise NonFiniteError(
                f"the student's weights are not finite after step {self.state.global_step}, "
                f"so {name} was not written (lower optim.lr, set optim.clip_grad or use bf16)"
            )
        if not self.is_main:
            return
        blob = checkpoint_state(
            self.config,
            student=self.student,
            ema=self.ema,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            state=self.state,
            global_batch=self.global_batch,
            steps_per_epoch=self.steps_per_epoch,
            class_names=self.class_names,
            random_streams=random_streams,
            teacher_digest=self.teacher_digest,
        )
        save_atomic(blob, self.run_dir / name)
        self.saved[name] = self.state.global_step


def read_checkpoint(path: str | Path) -> dict:
    """Load a training checkpoint and verify it is complete."""
    checkpoint = read_file(path)
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{path} is not a complete cskd training checkpoint (missing {', '.join(missing)})"
        )
    return checkpoint


def resume_checkpoint(config: Config, run_dir: Path) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from (path and contents), or ``(None, None)`` for a fresh run."""
    source = resume_path(config.train, run_dir)
    return source, read_checkpoint(source) if source is not None else None


def resume_path(train: TrainConfig, run_dir: Path) -> Path | None:
    if not train.resume:
        return None
    if train.resume == "auto":
        last = run_dir / "last.pt"
        return last if last.exists() else None
    return Path(train.resume)


def resume_run(
    config: Config,
    run_dir: Path,
    info: distributed.DistributedInfo,
    *,
    student: torch.nn.Module,
    ema: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler | None,
    global_batch: int,
    steps_per_epoch: int,
    teacher_digest: str | None = None,
) -> TrainState:
    """The state to train from: a fresh one, or the resumed run's (:func:`restore`); drops what a
    killed run logged after its last checkpoint, and checks that every rank resumes alike."""
    source, checkpoint = distributed.together(resume_checkpoint, config, run_dir)
    state = TrainState()
    if checkpoint is not None:
        state = restore(
            checkpoint,
            source=source,
            config=config,
            rank=info.rank,
            world_size=info.world_size,
            teacher_digest=teacher_digest,
            student=student,
            ema=ema,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            global_batch=global_batch,
            steps_per_epoch=steps_per_epoch,
        )
    if info.is_main:  # drop what a killed run logged after its last checkpoint (all, if none)
        truncate_after(run_dir / "metrics.jsonl", state.global_step, completed_epochs=state.epoch)
    distributed.check_same(
        state.global_step,
        what="the step to resume from",
        fix="every rank must read the same train.output_dir/last.pt (a filesystem all nodes share)",
    )
    return state


def restore(
    checkpoint: dict,
    *,
    source: Path,
    config: Config,
    rank: int,
    world_size: int = 1,
    teacher_digest: str | None = None,
    student: torch.nn.Module,
    ema: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler | None,
    global_batch: int,
    steps_per_epoch: int,
) -> TrainState:
    """Load a training checkpoint into the built student, EMA, optimizer and scaler; returns the
    state to continue from. The learning-rate schedule is never read from the checkpoint: the
    one built from this run's config is moved to the resumed position, as timm's train.py does,
    so a run resumed with more images, another batch or other epochs follows the schedule of
    its new length. Every setting that differs from the saved run's is named in one warning.
    With another global batch the epoch resumes at the step covering the same images. Each rank
    takes its own saved random streams (exact resume); with another world size, rank 0 takes
    rank 0's and the others start new ones. A teacher whose weights differ from those the run
    was trained with (``teacher_digest``, when both are known) is refused."""
    preflight.check_resume(checkpoint, path=source, config=config, student=student, ema=ema)
    saved_teacher = (checkpoint.get("teacher") or {}).get("weights_sha256")
    if saved_teacher and teacher_digest and saved_teacher != teacher_digest:
        raise ConfigError(
            f"teacher.checkpoint {config.teacher.checkpoint or config.teacher.name} holds other "
            f"weights than the run in {source} was trained with (digest {teacher_digest[:12]}, "
            f"saved {saved_teacher[:12]}): put the original teacher back, or start a new run"
        )
    student.load_state_dict(checkpoint["student"])
    if ema is not None and checkpoint.get("ema") is not None:
        ema.module.load_state_dict(checkpoint["ema"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    state = TrainState(**checkpoint["state"])
    epochs = config.optim.epochs
    if state.epoch > epochs or (state.epoch == epochs and state.step_in_epoch):
        raise ConfigError(
            f"{source} has already trained {state.epoch} epochs"
            f"{f' and {state.step_in_epoch} steps' if state.step_in_epoch else ''}, more than "
            f"optim.epochs={epochs}: resuming would train nothing and rewrite the run's results "
            f"as a shorter one; set optim.epochs>={state.epoch + bool(state.step_in_epoch)} or "
            "another train.output_dir"
        )
    saved_batch = checkpoint.get("global_batch", global_batch)
    saved_steps = checkpoint.get("steps_per_epoch", steps_per_epoch)
    if saved_batch != global_batch:  # another world size or batch: the epoch's images kept
        state.step_in_epoch = resume_step(
            state.step_in_epoch, saved_global_batch=saved_batch, global_batch=global_batch
        )
    changes = changed_settings(checkpoint["config"], to_dict(config))
    if saved_batch != global_batch:
        changes.append(f"global batch {saved_batch} -> {global_batch}")
    if saved_steps != steps_per_epoch:
        changes.append(f"steps per epoch {saved_steps} -> {steps_per_epoch}")
    if changes:
        log.warning(
            f"resuming with other settings than the saved run ({'; '.join(changes)}): they "
            f"apply from epoch {state.epoch} step {state.step_in_epoch} of {steps_per_epoch}, "
            "and the learning rate and a(t) follow the schedule they give"
        )
    streams = checkpoint.get("rng_ranks") or [checkpoint["rng"]]
    if len(streams) == world_size:
        set_rng_state(streams[rank])
    else:  # another world size: rank 0 continues rank 0's streams, the others start new ones
        set_rng_state(streams[0])
        if rank:
            seed_everything(sample_seed(config.train.seed, state.global_step, rank, 2**32 - 2))
    scheduler.step_update(num_updates=state.epoch * steps_per_epoch + state.step_in_epoch)
    log.info(f"resumed from {source} at epoch {state.epoch} step {state.global_step}")
    return state


def changed_settings(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``"key old -> new"`` for every config key whose value differs between the saved run's
    config and this one (both as :func:`~cskd.config.to_dict` gives them), leaving out the
    keys that only say how to start (``train.resume``, ``train.overwrite``)."""
    changes = []
    for key in current.keys() | saved.keys():
        name = f"{prefix}{key}"
        old, new = saved.get(key), current.get(key)
        if name in ("train.resume", "train.overwrite") or old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict) and prefix == "":
            changes += changed_settings(old, new, f"{name}.")
        else:
            changes.append(f"{name} {old} -> {new}")
    return sorted(changes)


@dataclass
class TrainState:
    epoch: int = 0  # the epoch being trained (counted from 0)
    step_in_epoch: int = 0  # optimisation steps already done in this epoch
    global_step: int = 0
    best_metric: float = -1.0
    best: dict = field(default_factory=dict)  # per rule: top1, top5, epoch of the best epoch
    # the epoch's loss parts summed so far, and over how many steps: saved in checkpoints so that
    # an epoch resumed mid-way reports the same training means as an uninterrupted one
    epoch_sums: dict = field(default_factory=dict)
    epoch_steps: int = 0
