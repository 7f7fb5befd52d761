"""Training and evaluation runs, assembled from one builder per feature.

``train(config)`` reads top to bottom: process group, run directory, data, models, optimisation,
augmentation on the device, resume, then the epoch loop of train / evaluate / checkpoint, and at
the end ``student.safetensors``. ``evaluate_checkpoint`` re-measures a saved checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from . import diagnostics, distributed, preflight
from .cached_teacher import open_cached_teacher
from .checkpoint import (
    CheckpointError,
    read_file,
    remove_stale_temporaries,
    save_atomic,
    save_safetensors_atomic,
)
from .config import Config, ConfigError, apply_overrides, dump_config, from_dict, to_dict
from .data import build_datasets, build_eval_set, build_test_set
from .data.sampling import EpochSampler, eval_loader, resume_step, sample_seed, train_loader
from .engine import Distiller, Trainer, TrainState, evaluate, normalizer
from .losses import ObjectiveWeights
from .models import (
    DenseTeacher,
    TeacherError,
    create_pretrained,
    load_teacher,
    rules_for,
    wrap_student,
)
from .runlog import MetricsWriter, setup_logging, truncate_after
from .schedules import training_progress
from .weights import (
    classifier_weights,
    export_metadata,
    init_from,
    load_adapted,
    read_export_metadata,
    read_state_dict,
    resolve_source,
)

log = logging.getLogger("cskd")
CHECKPOINT_KEYS = ("student", "optimizer", "scheduler", "state", "rng", "config")
RESULTS = ("last.pt", "best.pt", "student.safetensors", "final_metrics.json")  # a run's results
# A saved run is evaluated under every rule; its rules resolve from its method, so that runs
# saved before `auto` (e.g. deit with cls+dist+patch) still load.
RULES_FOR_SAVED = ["student.inference_rule=auto", "train.best_rule=auto"]
# optim keys that define the learning-rate schedule (a timm scheduler's saved state holds them)
SCHEDULE_KEYS = ("epochs", "warmup_epochs", "warmup_lr", "min_lr", "schedule_unit")


# ---------------------------------------------------------------------------------- builders


def prepare_run_dir(config: Config, *, is_main: bool) -> Path:
    """Create the run directory; refuse one that holds another run unless resuming/overwriting."""
    run_dir = Path(config.train.output_dir)
    # a run that never reached a checkpoint (died at step 1, say) holds nothing to lose
    holds_run = any((run_dir / name).exists() for name in RESULTS)
    if holds_run and not config.train.resume and not config.train.overwrite:
        raise ConfigError(
            f"train.output_dir {run_dir} already holds a run: pass train.resume=auto to continue "
            "it, train.overwrite=true to replace it, or choose another train.output_dir"
        )
    if is_main:
        if holds_run and config.train.overwrite and not config.train.resume:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir)  # of checkpoint writes a kill interrupted
    return run_dir


def build_student(config: Config, *, initial_weights: bool = False) -> torch.nn.Module:
    """The student, wrapped (:func:`~cskd.models.wrap_student`). With ``initial_weights`` (a
    fresh training run) it starts from ``student.checkpoint`` or ``student.pretrained_tag``,
    adapted by :func:`cskd.weights.init_from`; ``student.trainable=head`` then freezes all but
    the classifier heads."""
    kwargs = {
        "num_classes": config.data.num_classes,
        "in_chans": config.data.in_chans,
        "drop_path_rate": config.student.drop_path,
        **config.student.kwargs,
    }
    name, what = config.student.name, f"student {config.student.name}"
    if initial_weights and config.student.pretrained_tag:
        model = create_pretrained(
            name,
            config.student.pretrained_tag,
            what="student",
            reset_head=config.student.reset_head,
            **kwargs,
        )
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
    if initial_weights and config.student.checkpoint:
        for line in init_from(
            model,
            config.student.checkpoint,
            what=what,
            ema=config.student.checkpoint_ema,
            reset_head=config.student.reset_head,
        ):
            log.info(line)
    if config.student.trainable == "head":
        heads = {key.rsplit(".", 1)[0] for key, _ in classifier_weights(model)}
        if not heads:
            raise ConfigError(
                f"student.trainable=head: {name} has no linear classifier head to train "
                "(timm's get_classifier); use student.trainable=all"
            )
        for parameter_name, parameter in model.named_parameters():
            parameter.requires_grad_(parameter_name.rsplit(".", 1)[0] in heads)
        log.info(f"{what}: only {', '.join(sorted(heads))} train (student.trainable=head)")
    return wrap_student(model, inference_rule=config.student.inference_rule)


def build_teacher(config: Config, *, dense: bool | None = None) -> DenseTeacher | None:
    """The frozen teacher of ``distill`` (None for ``none``). It gives dense logits whenever its
    model can (CSKD needs them; for DeiT they feed the diagnostics); a teacher that cannot (a
    ViT) is refused under CSKD and gives global logits only under DeiT. ``dense=True`` forces
    dense logits (``cskd diagnose``)."""
    if config.distill.method == "none" and dense is None:
        return None

    def load(with_dense: bool) -> DenseTeacher:
        return load_teacher(
            config.teacher.name,
            config.teacher.checkpoint or None,
            num_classes=config.data.num_classes,
            pretrained_tag=config.teacher.pretrained_tag or None,
            dense=with_dense,
            image_size=config.data.image_size,
            **{"in_chans": config.data.in_chans, **config.teacher.kwargs},
        )

    if dense or config.distill.method == "cskd":
        return load(True)
    try:
        return load(True)
    except TeacherError:  # DeiT distillation needs only the global logits
        return load(False)


def scaled_lr(config: Config, global_batch: int) -> float:
    """The recipe's learning rate scaled linearly to the global batch."""
    return config.optim.lr * global_batch / config.optim.lr_batch_reference


def check_lr_schedule(config: Config, global_batch: int) -> float:
    """The peak learning rate for ``global_batch``; ConfigError if the warm-up start or the floor
    of the cosine (not scaled with the batch, as in DeiT) reaches it, which would make the
    "decay" climb (a small batch or a fine-tuning lr can put the peak under 1e-5)."""
    lr = scaled_lr(config, global_batch)
    shown = (
        f"the peak learning rate {lr:.3g} (= optim.lr {config.optim.lr:g} x {global_batch} "
        f"images / optim.lr_batch_reference {config.optim.lr_batch_reference})"
    )
    if config.optim.min_lr >= lr:
        raise ConfigError(
            f"optim.min_lr={config.optim.min_lr:g} is not below {shown}, so the cosine schedule "
            "would rise instead of decay: lower optim.min_lr (e.g. to a hundredth of the peak), "
            "or raise optim.lr (or lower optim.lr_batch_reference)"
        )
    if config.optim.warmup_epochs and config.optim.warmup_lr > lr:
        raise ConfigError(
            f"optim.warmup_lr={config.optim.warmup_lr:g} is above {shown}, so the warm-up would "
            "go down: lower optim.warmup_lr or raise optim.lr"
        )
    return lr


def build_optimization(
    config: Config, student: torch.nn.Module, *, lr: float, steps_per_epoch: int
):
    """AdamW (or any timm optimizer) without weight decay on norms, biases and tokens; cosine
    with warm-up, updated every step or (``optim.schedule_unit=epoch``, as DeiT) every epoch."""
    optimizer = create_optimizer_v2(
        student.model, opt=config.optim.name, lr=lr, weight_decay=config.optim.weight_decay
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=config.optim.epochs,
        warmup_epochs=config.optim.warmup_epochs,
        warmup_lr=config.optim.warmup_lr,
        min_lr=config.optim.min_lr,
        step_on_epochs=config.optim.schedule_unit == "epoch",
        updates_per_epoch=steps_per_epoch,
    )
    return optimizer, scheduler


def build_eval_loaders(config: Config, val_set, info: distributed.DistributedInfo):
    """The validation loader, and with ``train.eval_test`` the official test split's (else
    None): every image once over all ranks."""
    common = dict(
        batch_size=config.data.eval_batch_size or 2 * config.data.batch_size,
        workers=config.data.workers,
        rank=info.rank,
        world_size=info.world_size,
        pin_memory=info.device.type == "cuda",
    )
    test_loader = None
    if config.train.eval_test:
        test_set = distributed.together(build_test_set, config.data, config.augment)
        test_loader = eval_loader(test_set, **common)
    return eval_loader(val_set, **common), test_loader


def build_batch_augmentation(config: Config, device: torch.device):
    """Random erasing and Mixup/CutMix, applied to the normalised batch on the device."""
    augment = config.augment
    erasing = (
        RandomErasing(probability=augment.reprob, mode="pixel", device=str(device))
        if augment.reprob > 0
        else None
    )
    mixup = None
    if augment.mixup > 0 or augment.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=augment.mixup,
            cutmix_alpha=augment.cutmix,
            switch_prob=augment.mixup_switch_prob,
            label_smoothing=augment.label_smoothing,
            num_classes=config.data.num_classes,
        )
    return erasing, mixup


def build_distiller(
    config: Config,
    student: torch.nn.Module,
    teacher: DenseTeacher | None,
    *,
    device: torch.device,
    mixup: bool,
    method: str | None = None,
) -> Distiller:
    """Student (possibly DDP-wrapped) + teacher + the objective of ``distill``; ``method``
    overrides ``distill.method``. With Mixup the targets already carry the label smoothing."""
    method = method or config.distill.method
    weights = ObjectiveWeights(
        method=method,
        alpha=config.distill.alpha,
        cskd_weight=config.distill.cskd_weight,
        token_kind=config.distill.token_kind,
        cskd_kind=config.distill.cskd_kind,
        schedule=config.distill.schedule,
        tau=config.distill.tau,
        label_smoothing=0.0 if mixup else config.augment.label_smoothing,
    )
    return Distiller(
        student,
        teacher if method != "none" else None,
        weights,
        student_norm=normalizer(config.data.mean, config.data.std, device),
        teacher_norm=normalizer(config.teacher.mean, config.teacher.std, device),
    ).to(device)


def place_teacher(
    config: Config, teacher: DenseTeacher, device: torch.device, *, compile: bool = True
) -> DenseTeacher:
    """The teacher on ``device`` at its precision (``teacher.amp``), channels-last where it helps
    (``teacher.memory_format``: ``auto`` on a GPU, where convolutions under autocast prefer it)
    and compiled with the student (``train.compile``)."""
    teacher = teacher.to(device)
    teacher.amp_dtype = teacher_amp_dtype(config, device)
    memory_format = config.teacher.memory_format
    if memory_format == "channels_last" or (memory_format == "auto" and device.type == "cuda"):
        teacher = teacher.to(memory_format=torch.channels_last)
        teacher.channels_last = True
    if config.train.compile and compile:
        teacher.compile(backend=config.train.compile_backend)
    return teacher


def teacher_amp_dtype(config: Config, device: torch.device) -> torch.dtype:
    """The teacher's precision: ``auto`` is fp16 on a GPU (as the release runs its teacher, and
    10x fewer flipped hard targets than bf16, docs/results/teacher_precision.md), fp32 on CPU."""
    amp = config.teacher.amp
    if amp == "auto":
        amp = "fp16" if device.type == "cuda" else "fp32"
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def amp_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    amp = config.train.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------- checkpoints


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


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_state(
    config, student, ema, optimizer, scheduler, scaler, state: TrainState, *, global_batch: int
) -> dict:
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
        "rng": rng_state(),  # rank 0's
        "global_batch": global_batch,  # state.step_in_epoch counts steps of this many images
        "config": to_dict(config),
        "teacher": {
            "name": config.teacher.name,
            "checkpoint": config.teacher.checkpoint,
            "pretrained_tag": config.teacher.pretrained_tag,
        },
    }


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
    source = resume_path(config, run_dir)
    return source, read_checkpoint(source) if source is not None else None


def resume_path(config: Config, run_dir: Path) -> Path | None:
    if not config.train.resume:
        return None
    if config.train.resume == "auto":
        last = run_dir / "last.pt"
        return last if last.exists() else None
    return Path(config.train.resume)


# ---------------------------------------------------------------------------------- the run


class StopRequest:
    """Turns SIGTERM (what cluster schedulers send first) and a first Ctrl-C into a save at the
    next step boundary; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict = {}

    def __enter__(self) -> StopRequest:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            log.info("Ctrl-C: saving last.pt at the next step boundary (again to stop at once)")
        self.requested = True

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def train(config: Config) -> dict:
    """Run (or resume) training; returns the final epoch's evaluation metrics."""
    info = distributed.init_distributed(
        device=config.train.device,
        backend=config.train.dist_backend,
        timeout_s=config.train.dist_timeout_s,
    )
    try:
        with StopRequest() as stop:
            final = _train(config, info, stop)
    except Exception as error:
        if info.enabled:  # torchrun interleaves the ranks' output: say which rank this is
            log.error(
                f"rank {info.rank} of {info.world_size} failed: {type(error).__name__}: {error}",
                extra={"all_ranks": True},
            )
        raise  # the process exits; torchrun then stops the other ranks
    distributed.shutdown()
    return final


def _train(config: Config, info: distributed.DistributedInfo, stop: StopRequest) -> dict:
    global_batch = config.data.batch_size * info.world_size
    lr = check_lr_schedule(config, global_batch)
    preflight.check_models(config)  # names and kwargs, on the meta device: before any writing
    run_dir = distributed.together(prepare_run_dir, config, is_main=info.is_main)
    setup_logging(rank=info.rank, log_file=run_dir / "train.log")
    device = info.device
    seed_everything(config.train.seed)  # the same initial weights (and EMA) on every rank

    distributed.together(preflight.check_data_source, config.data)
    train_set, val_set = distributed.together(build_datasets, config.data, config.augment)
    sampler = EpochSampler(
        train_set,
        seed=config.train.seed,
        rank=info.rank,
        world_size=info.world_size,
        repeats=3 if config.augment.repeated_aug else 1,
    )
    batch_size = config.data.batch_size
    steps_per_epoch = len(sampler) // batch_size
    if config.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.train.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"data.batch_size {batch_size} exceeds the {len(sampler)} training samples per process"
        )
    val_loader, test_loader = build_eval_loaders(config, val_set, info)

    fresh = resume_path(config, run_dir) is None  # a resumed run's weights come from last.pt
    student = distributed.together(build_student, config, initial_weights=fresh).to(device)
    teacher = distributed.together(build_teacher, config)
    if teacher is not None:
        # with a cache the teacher serves only the pre-flight and diagnostics: not compiled
        teacher = place_teacher(config, teacher, device, compile=not config.teacher.cache)
    cached_teacher = None  # teacher.cache: the step reads the teacher's targets from disk
    if config.teacher.cache:
        cached_teacher = distributed.together(
            open_cached_teacher, config, teacher=teacher, train_set=train_set, device=device
        )
    if config.train.channels_last:
        student = student.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(student, decay=config.train.ema_decay) if config.train.ema else None
    seed_everything(config.train.seed + info.rank)  # each rank its own dropout, Mixup, erasing

    optimizer, scheduler = build_optimization(
        config, student, lr=lr, steps_per_epoch=steps_per_epoch
    )
    dtype = amp_dtype(config, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    erasing, mixup = build_batch_augmentation(config, device)
    student_norm = normalizer(config.data.mean, config.data.std, device)
    teacher_norm = normalizer(config.teacher.mean, config.teacher.std, device)

    trained = student
    if info.enabled:
        trained = torch.nn.parallel.DistributedDataParallel(
            student,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.distill.method == "none",
        )
    if config.train.compile:
        trained = torch.compile(trained, backend=config.train.compile_backend)
    distiller = build_distiller(config, trained, teacher, device=device, mixup=mixup is not None)
    distributed.together(
        preflight.check_run,
        config,
        student=student,
        teacher=teacher,
        train_set=train_set,
        val_set=val_set,
        device=device,
        student_norm=student_norm,
        teacher_norm=teacher_norm,
        is_main=info.is_main,
    )

    if info.is_main:  # warnings only once every check has passed (errors stay one line)
        preflight.check_machine(config, world_size=info.world_size)
    state = resume_run(
        config,
        run_dir,
        info,
        models=(student, ema),
        optimization=(optimizer, scheduler, scaler),
        global_batch=global_batch,
        steps_per_epoch=steps_per_epoch,
    )
    metrics_writer = MetricsWriter(run_dir, enabled=info.is_main, resume_step=state.global_step)
    if info.is_main:
        (run_dir / "config.yaml").write_text(dump_config(config))
    log.info(
        f"{config.distill.method} | student {config.student.name} | teacher "
        f"{config.teacher.name if teacher is not None else '-'} | {info.world_size} process(es) "
        f"on {device} | effective batch {global_batch} (= {batch_size} x {info.world_size}) | "
        f"lr {lr:.3g} "
        f"(= {config.optim.lr:g} x {global_batch} / {config.optim.lr_batch_reference}) | "
        f"{steps_per_epoch} steps/epoch x {config.optim.epochs} epochs"
    )

    def save(name: str) -> None:
        if info.is_main:
            blob = checkpoint_state(
                config, student, ema, optimizer, scheduler, scaler, state, global_batch=global_batch
            )
            save_atomic(blob, run_dir / name)

    trainer = Trainer(
        distiller=distiller,
        optimizer=optimizer,
        scheduler=scheduler,
        device=device,
        epochs=config.optim.epochs,
        steps_per_epoch=steps_per_epoch,
        progress_unit=config.distill.progress,
        schedule=config.distill.schedule,
        mixup=mixup,
        erasing=erasing,
        ema=ema,
        scaler=scaler,
        amp_dtype=dtype,
        clip_grad=config.optim.clip_grad,
        student_norm=student_norm,
        log_interval=config.train.log_interval,
        show_progress=info.is_main and sys.stderr.isatty(),
        on_log=metrics_writer.write,
        should_stop=lambda: (  # agreed by all ranks, so that they stop at the same step
            distributed.any_rank(stop.requested)
            or 0 < config.train.stop_after_steps <= state.global_step
        ),
        on_checkpoint=lambda: save("last.pt"),
        checkpoint_interval=config.train.checkpoint_interval,
        cached_teacher=cached_teacher,
    )
    evaluation = EpochEvaluation(
        config=config,
        student=student,
        ema=ema,
        teacher=teacher,
        loaders=(val_loader, test_loader),
        device=device,
        student_norm=student_norm,
        amp_dtype=dtype,
        steps_per_epoch=steps_per_epoch,
        probe=diagnostics.Probe(
            val_set,
            count=config.train.diagnostics_images,
            student_norm=student_norm,
            teacher_norm=teacher_norm,
            schedule=config.distill.schedule,
        )
        if config.train.diagnostics and info.is_main
        else None,
    )
    loader = train_loader(  # its workers persist; each epoch iterates it anew
        train_set,
        sampler,
        batch_size=batch_size,
        workers=config.data.workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=config.data.prefetch_factor,
    )
    final, test, finished = run_epochs(
        config,
        trainer=trainer,
        evaluation=evaluation,
        loader=loader,
        sampler=sampler,
        state=state,
        save=save,
        metrics_writer=metrics_writer,
        run_dir=run_dir,
    )
    if not finished:  # stopped on request: last.pt holds the run
        metrics_writer.close()
        return final
    if info.is_main:
        write_final_outputs(
            run_dir,
            config,
            student=student,
            ema=ema,
            state=state,
            last=final,
            test=test,
            classes=list(getattr(train_set, "classes", None) or []),
        )
    metrics_writer.close()
    return final


def resume_run(
    config: Config,
    run_dir: Path,
    info: distributed.DistributedInfo,
    *,
    models: tuple,
    optimization: tuple,
    global_batch: int,
    steps_per_epoch: int,
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
            models=models,
            optimization=optimization,
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


def run_epochs(
    config: Config,
    *,
    trainer: Trainer,
    evaluation: EpochEvaluation,
    loader,
    sampler: EpochSampler,
    state: TrainState,
    save: Callable[[str], None],
    metrics_writer: MetricsWriter,
    run_dir: Path,
) -> tuple[dict, dict | None, bool]:
    """Train, evaluate and checkpoint epoch after epoch from ``state``; returns the last
    evaluation (validation, test or None) and whether the run reached its end (False: it
    stopped on request and ``last.pt`` holds it)."""
    final: dict = {}
    test: dict | None = None
    epochs, steps_per_epoch = config.optim.epochs, trainer.steps_per_epoch
    while state.epoch < epochs:
        sampler.set_epoch(state.epoch, start=state.step_in_epoch * config.data.batch_size)
        train_means = trainer.train_one_epoch(loader, state)
        stopping = trainer.should_stop()
        if stopping and state.step_in_epoch < steps_per_epoch:
            save("last.pt")
            log.info(f"stop requested: saved {run_dir / 'last.pt'} at step {state.global_step}")
            return final, test, False
        evaluated = (state.epoch + 1) % config.train.eval_interval == 0 or state.epoch + 1 == epochs
        record = {"type": "epoch", "epoch": state.epoch, "step": state.global_step}
        record["train"] = train_means
        if evaluated:
            record.update(evaluation.run(epoch=state.epoch))
            final, test = record["eval"], record.get("test")
            update_best(state.best, final, epoch=state.epoch)
        metrics_writer.write(record)
        log.info(_summary(state.epoch, epochs, train_means, final if evaluated else {}))
        state.epoch, state.step_in_epoch = state.epoch + 1, 0
        if evaluated and _metric(final, config.train.best_rule) > state.best_metric:
            state.best_metric = _metric(final, config.train.best_rule)
            save("best.pt")
        save("last.pt")
        if stopping:
            log.info(f"stop requested: saved {run_dir / 'last.pt'} after epoch {state.epoch}")
            return final, test, False
    if not final:  # resumed after the last epoch (killed while writing the outputs)
        measured = evaluation.run(epoch=state.epoch - 1, with_diagnostics=False)
        final, test = measured["eval"], measured.get("test")
    return final, test, True


def restore(
    checkpoint: dict,
    *,
    source: Path,
    config: Config,
    rank: int,
    models: tuple,
    optimization: tuple,
    global_batch: int,
    steps_per_epoch: int,
) -> TrainState:
    """Load a training checkpoint into the built student and EMA ``models`` and the optimizer,
    scheduler and scaler of ``optimization``; returns the state to continue from. With another
    global batch the epoch resumes at the step covering the same images and the schedule is
    rebuilt; the random streams are rank 0's, other ranks start new ones."""
    student, ema = models
    optimizer, scheduler, scaler = optimization
    preflight.check_resume(checkpoint, path=source, config=config, student=student, ema=ema)
    student.load_state_dict(checkpoint["student"])
    if ema is not None and checkpoint.get("ema") is not None:
        ema.module.load_state_dict(checkpoint["ema"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    state = TrainState(**checkpoint["state"])
    saved_batch = checkpoint.get("global_batch", global_batch)
    saved_schedule = {k: checkpoint["config"]["optim"].get(k) for k in SCHEDULE_KEYS}
    schedule = {k: getattr(config.optim, k) for k in SCHEDULE_KEYS}
    if saved_schedule != schedule:  # e.g. more epochs: the schedule follows the new config
        changed = ", ".join(
            f"optim.{k} {saved_schedule[k]} -> {schedule[k]}"
            for k in SCHEDULE_KEYS
            if saved_schedule[k] != schedule[k]
        )
        log.warning(
            f"resuming with another schedule ({changed}): the learning rate and a(t) follow the "
            f"new one from epoch {state.epoch}, step {state.step_in_epoch}"
        )
    if saved_batch != global_batch:  # another world size or batch: the epoch's images kept
        state.step_in_epoch = resume_step(
            state.step_in_epoch, saved_global_batch=saved_batch, global_batch=global_batch
        )
        log.info(
            f"global batch {saved_batch} -> {global_batch}: epoch {state.epoch} resumes at "
            f"step {state.step_in_epoch} of {steps_per_epoch}"
        )
    if saved_schedule == schedule and saved_batch == global_batch:
        scheduler.load_state_dict(checkpoint["scheduler"])  # else rebuilt for the new run
    set_rng_state(checkpoint["rng"])
    if rank:  # the checkpoint holds rank 0's random streams; the others start new ones
        seed_everything(sample_seed(config.train.seed, state.global_step, rank, 2**32 - 2))
    scheduler.step_update(num_updates=state.epoch * steps_per_epoch + state.step_in_epoch)
    log.info(f"resumed from {source} at epoch {state.epoch} step {state.global_step}")
    return state


@dataclass
class EpochEvaluation:
    """What is measured after an evaluated epoch: every rule (and the EMA) on the validation
    set, on the official test set with ``train.eval_test``, and the diagnostics probe."""

    config: Config
    student: torch.nn.Module
    ema: ModelEmaV3 | None
    teacher: DenseTeacher | None
    loaders: tuple  # (validation, test or None)
    device: torch.device
    student_norm: tuple[torch.Tensor, torch.Tensor]
    amp_dtype: torch.dtype | None
    steps_per_epoch: int
    probe: diagnostics.Probe | None = None

    def run(self, *, epoch: int, with_diagnostics: bool = True) -> dict:
        """``{"eval": ..., "test": ... (optional), "diagnostics": ... (optional)}``."""
        val_loader, test_loader = self.loaders
        measure = dict(
            student=self.student,
            ema=self.ema,
            rules=rules_for(self.student),
            device=self.device,
            norm=self.student_norm,
            dtype=self.amp_dtype,
            config=self.config,
        )
        result = {"eval": _evaluate_all(loader=val_loader, **measure)}
        if test_loader is not None:  # reported, never used for a choice (best.pt follows val)
            result["test"] = _evaluate_all(loader=test_loader, **measure)
        if self.probe is not None and with_diagnostics:  # a(t) of the epoch just trained
            progress = training_progress(
                epoch=epoch,
                step_in_epoch=0,
                steps_per_epoch=self.steps_per_epoch,
                epochs=self.config.optim.epochs,
                unit=self.config.distill.progress,
            )
            result["diagnostics"] = self.probe.measure(
                self.student, self.teacher, progress=progress
            )
        return result


def write_final_outputs(
    run_dir: Path,
    config: Config,
    *,
    student,
    ema,
    state: TrainState,
    last: dict,
    test: dict | None,
    classes: list[str],
) -> None:
    """``student.safetensors`` (and the EMA's), each describing itself
    (:func:`export_info`), ``final_metrics.json`` and the summary line."""
    metadata = export_info(config, classes)
    save_safetensors_atomic(
        student.state_dict(), run_dir / "student.safetensors", metadata=metadata
    )
    if ema is not None:
        save_safetensors_atomic(
            ema.module.state_dict(), run_dir / "student_ema.safetensors", metadata=metadata
        )
    summary = final_summary(last, state.best, last_epoch=config.optim.epochs - 1, test=test)
    (run_dir / "final_metrics.json").write_text(json.dumps(summary, indent=2))
    log.info(_final_line(summary, config.train.best_rule))


def export_info(config: Config, classes: list[str]) -> dict[str, str]:
    """What an exported student says about itself (:func:`cskd.weights.export_metadata`):
    enough to rebuild it (:func:`cskd.models.load_student`) and feed it images."""
    size = config.data.image_size
    return export_metadata(
        timm_name=config.student.name,
        model_kwargs={
            **config.student.kwargs,
            "num_classes": config.data.num_classes,
            "in_chans": config.data.in_chans,
        },
        num_classes=config.data.num_classes,
        class_names=[str(name) for name in classes],
        input_size=[config.data.in_chans, size, size],
        mean=list(config.data.mean),
        std=list(config.data.std),
        interpolation=config.augment.interpolation,
        crop_pct=config.data.eval_crop_pct,
        inference_rule=config.student.inference_rule,
        method=config.distill.method,
    )


def update_best(best: dict, metrics: dict, *, epoch: int) -> None:
    """Keep, per rule (and per rule of the EMA weights under ``best["ema"]``), the epoch of the
    highest top-1 so far: ``{rule: {"top1", "top5", "epoch"}}``; ties keep the earlier epoch."""
    for rule, values in metrics.items():
        if rule == "images":
            continue
        if rule == "ema":
            update_best(best.setdefault("ema", {}), values, epoch=epoch)
        elif rule not in best or values["top1"] > best[rule]["top1"]:
            best[rule] = {"top1": values["top1"], "top5": values["top5"], "epoch": epoch}


def final_summary(last: dict, best: dict, *, last_epoch: int, test: dict | None = None) -> dict:
    """What ``final_metrics.json`` holds: the last epoch's metrics (what this project reports)
    and each rule's best epoch (what the CSKD release reports), raw and EMA; with
    ``train.eval_test`` also the official test split's metrics at the last epoch."""
    summary = {
        "last_epoch": {"epoch": last_epoch, **last},
        "best_epoch": best,
        "note": (
            "last_epoch: every rule at the end of training (the weights in student.safetensors); "
            "best_epoch: per rule, the epoch with the highest validation top-1 (what the CSKD "
            "release reports; a choice made on the validation set). Epochs count from 0 "
            "here, from 1 in train.log"
        ),
    }
    if test is not None:
        summary["test_last_epoch"] = test
    return summary


def _final_line(summary: dict, rule: str) -> str:
    ema, name = rule.startswith("ema/"), rule.removeprefix("ema/")
    last = summary["last_epoch"].get("ema", {}) if ema else summary["last_epoch"]
    best = summary["best_epoch"].get("ema", {}) if ema else summary["best_epoch"]
    if name not in last or name not in best:
        return "finished"
    return (
        f"finished: {rule} top-1 {last[name]['top1']:.2f} at the last epoch "
        f"({summary['last_epoch']['epoch'] + 1}), best {best[name]['top1']:.2f} at epoch "
        f"{best[name]['epoch'] + 1} (the release reports the best epoch)"
    )


def _evaluate_all(student, ema, loader, rules, device, norm, dtype, config) -> dict:
    common = dict(
        loader=loader,
        rules=rules,
        device=device,
        student_norm=norm,
        amp_dtype=dtype,
        max_batches=config.train.eval_max_batches,
    )
    metrics = evaluate(student, **common)
    if ema is not None:
        metrics["ema"] = evaluate(ema.module, **common)
    return metrics


def _metric(metrics: dict, rule: str) -> float:
    if rule.startswith("ema/"):
        return metrics["ema"][rule[4:]]["top1"] if "ema" in metrics else -math.inf
    return metrics[rule]["top1"] if rule in metrics else metrics["cls"]["top1"]


def _summary(epoch: int, epochs: int, train_means: dict, metrics: dict) -> str:
    """The epoch's log line; ``metrics`` is empty for an epoch that was not evaluated."""
    rules = [key for key in metrics if key not in ("images", "ema")]
    shown = " ".join(f"{rule} {metrics[rule]['top1']:.2f}" for rule in rules)
    if "ema" in metrics:
        shown += " | ema " + " ".join(
            f"{rule} {metrics['ema'][rule]['top1']:.2f}" for rule in rules
        )
    return (
        f"epoch {epoch + 1}/{epochs} loss {train_means.get('loss', float('nan')):.4f} "
        f"({train_means['epoch_time_s']:.0f}s)" + (f" | top-1 {shown}" if metrics else "")
    )


def evaluate_checkpoint(config: Config | list[str] | None, checkpoint_path: str | Path) -> dict:
    """Metrics of saved weights under every rule (and of their EMA weights, when saved).

    ``checkpoint_path``: a cskd training checkpoint (``last.pt``, ``best.pt``), a run directory
    (its ``last.pt``, else its exported student) or an exported ``student.safetensors``, whose
    metadata rebuilds the model. ``config``: a Config, or ``key=value`` overrides of the
    checkpoint's own config (an exported student's: its model and normalisation, with
    ``data.dataset=folder``, so ``data.root=FOLDER`` is all it needs; only ``val/`` is read).
    ``data.image_size`` may differ from training: a ViT's position embeddings are resampled.
    """
    path = Path(checkpoint_path)
    if path.is_dir():
        path = path / "last.pt" if (path / "last.pt").is_file() else resolve_source(path)
    exported = read_export_metadata(path) if path.suffix == ".safetensors" else None
    if exported is not None:
        saved_config = config_of_export(exported)
        state, _ = read_state_dict(path)
        states = {"student": state, "ema": None}
    elif path.suffix == ".safetensors":
        raise CheckpointError(
            f"{path} carries no cskd export metadata: evaluate a training checkpoint (last.pt) "
            "or a student.safetensors written by cskd train"
        )
    else:
        checkpoint = read_checkpoint(path)
        saved_config = checkpoint["config"]
        states = {"student": checkpoint["student"], "ema": checkpoint.get("ema")}
    if config is None or isinstance(config, list):  # the saved config, plus overrides
        config = from_dict(apply_overrides(saved_config, [*RULES_FOR_SAVED, *(config or [])]))
    if "pos_embed" in states["student"]:  # a ViT: built for the size it is evaluated at
        config.student.kwargs = {**config.student.kwargs, "img_size": config.data.image_size}
    info = distributed.init_distributed(
        device=config.train.device,
        backend=config.train.dist_backend,
        timeout_s=config.train.dist_timeout_s,
    )
    setup_logging(rank=info.rank)  # what was adapted (another image size) goes to stderr
    device = info.device
    val_set = build_eval_set(config.data, config.augment)
    if exported is not None and list(val_set.classes or []) != exported["class_names"]:
        log.warning(
            f"the model was trained on classes {exported['class_names'][:5]}... but the data has "
            f"{list(val_set.classes)[:5]}...: accuracy assumes both are in the same order"
        )
    loader = eval_loader(
        val_set,
        batch_size=config.data.eval_batch_size or 2 * config.data.batch_size,
        workers=config.data.workers,
        rank=info.rank,
        world_size=info.world_size,
        pin_memory=device.type == "cuda",
    )
    preflight.check_models(config)
    student = build_student(config)
    what = f"student {config.student.name}"
    for line in load_adapted(student, states["student"], path=path, what=what, adapt_head=False):
        log.info(line)
    student = student.to(device)
    ema = None
    if states["ema"] is not None:
        ema = ModelEmaV3(student, decay=config.train.ema_decay)
        load_adapted(
            ema.module, states["ema"], path=path, what=f"EMA of the {what}", adapt_head=False
        )
    norm = normalizer(config.data.mean, config.data.std, device)
    try:
        return _evaluate_all(
            student,
            ema,
            loader,
            rules_for(student),
            device,
            norm,
            amp_dtype(config, device),
            config,
        )
    finally:
        distributed.shutdown()


def config_of_export(info: dict) -> dict:
    """The config (as a dict) an exported student's metadata implies: its model, classes,
    input size, normalisation and rule, evaluated on an image folder (``data.root`` to set)."""
    kwargs = {
        key: value
        for key, value in info["model_kwargs"].items()
        if key not in ("num_classes", "in_chans")
    }
    channels, size, _ = info["input_size"]
    return {
        "student": {"name": info["timm_name"], "kwargs": kwargs},
        "data": {
            "dataset": "folder",
            "num_classes": info["num_classes"],
            "in_chans": channels,
            "image_size": size,
            "mean": info["mean"],
            "std": info["std"],
            "eval_crop_pct": info["crop_pct"],
            "workers": min(8, os.cpu_count() or 1),  # this machine's, not the training one's
        },
        "augment": {"interpolation": info["interpolation"]},
        "distill": {"method": info["method"]},  # its rules; evaluation runs no teacher
        "teacher": {"mean": info["mean"], "std": info["std"]},
    }
