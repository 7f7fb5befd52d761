"""A training run, assembled from one builder per feature.

``train(config)`` reads top to bottom: process group, checks before anything is written, the run
directory (locked), data, models, optimisation, augmentation on the device, resume, then
:class:`EpochLoop` (train / evaluate / checkpoint), and at the end ``student.safetensors``.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.utils import ModelEmaV3
from tqdm import tqdm

from ..config import Config, dump_config
from ..data import build_datasets
from ..data.sampling import EpochSampler, kill_loader_workers, worker_failure
from ..errors import NonFiniteError, ResourceError
from ..infra import distributed
from ..infra.checkpoint import write_text_atomic
from ..infra.runlog import MetricsWriter, setup_logging
from ..method.distiller import normalizer
from ..teacher.cached import open_cached_teacher
from ..teacher.store import tensors_digest
from . import diagnostics, preflight
from .build import (
    amp_dtype,
    build_batch_augmentation,
    build_distiller,
    build_eval_loaders,
    build_optimization,
    build_train_loader,
    check_lr_schedule,
    seed_everything,
    wrap_for_training,
)
from .engine import Trainer
from .evaluation import EpochEvaluation, epoch_line, rule_top1, update_best
from .models import build_student, build_teacher, place_teacher
from .outputs import write_final_outputs
from .rundir import RunDirectory, check_output_dir, claimed_run_dir
from .state import Checkpoints, TrainState, resume_path, resume_run

log = logging.getLogger("cskd")


class StopRequest:
    """Turns a stop signal into a save at the next step boundary, then an exit with status
    128 + the signal (:class:`RunStopped`): SIGTERM (what schedulers send first), SIGINT
    (Ctrl-C), SIGUSR1 (SLURM's ``--signal``, ahead of the time limit) and SIGHUP (a closed
    terminal). A second signal, or a first one before this process's first step has finished
    (nothing to save yet; the process may be blocked on a file that never answers), ends the
    process at once: ``on_abort`` (the run directory's clean-up) runs, one line is printed and
    the process exits without waiting for stuck threads."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)

    def __init__(self) -> None:
        self.signum = 0  # the first stop signal received, 0 for none
        self.armed = False  # a step has finished: a signal now means "save, then stop"
        self.held_by: Callable[[], str] | None = None  # which checkpoint holds the run
        self.on_abort: Callable[[], None] | None = None
        self.previous: dict = {}
        self.pid = os.getpid()

    @property
    def requested(self) -> bool:
        return bool(self.signum)

    def __enter__(self) -> StopRequest:
        for signum in self.SIGNALS:
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:  # a loader worker forked with this handler: rank 0 decides
            return
        name = signal.Signals(signum).name
        if self.armed and not self.signum:
            self.signum = signum
            log.info(f"{name}: saving last.pt at the next step boundary (again to stop at once)")
            return
        held = self.held_by() if self.held_by is not None else "nothing was saved"
        if self.signum:
            what = f"stopped at once by a second {name}; {held}"
        else:
            what = f"stopped by {name} before the first step; {held}"
        if self.on_abort is not None:
            self.on_abort()
        print(f"cskd train: error: {what}", file=sys.stderr, flush=True)
        logging.shutdown()
        kill_loader_workers()  # they ignore SIGTERM, and os._exit runs no atexit hook
        os._exit(128 + signum)  # not sys.exit: a thread stuck on a file would block the exit

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class RunStopped(Exception):
    """The run stopped on a signal after saving ``last.pt``; the CLI exits 128 + ``signum``."""

    def __init__(self, message: str, *, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def train(config: Config) -> dict:
    """Run (or resume) training; returns the final epoch's evaluation metrics."""
    info = distributed.init_distributed(
        device=config.train.device,
        backend=config.train.dist_backend,
        timeout_s=config.train.dist_timeout_s,
    )
    try:
        global_batch = config.data.batch_size * info.world_size
        lr = check_lr_schedule(config.optim, global_batch)
        preflight.check_models(config)  # names and kwargs, on the meta device: before any writing
        distributed.together(preflight.check_data_source, config.data)
        check_output_dir(config)
        with (
            StopRequest() as stop,
            claimed_run_dir(config.train, is_main=info.is_main) as run,
        ):
            stop.on_abort = run.abandon
            final = _train(config, info, stop, run=run, global_batch=global_batch, lr=lr)
            stop.on_abort = None
    except Exception as caught:
        error = worker_failure(caught) or memory_failure(caught, config) or caught
        if info.enabled:  # torchrun interleaves the ranks' output: say which rank this is
            log.error(
                f"rank {info.rank} of {info.world_size} failed: {type(error).__name__}: {error}",
                extra={"all_ranks": True},
            )
        if error is not caught:
            raise error from None  # the process exits; torchrun then stops the other ranks
        raise
    distributed.shutdown()
    if stop.signum:  # saved, but not finished: a scheduler must not take it for finished
        name = signal.Signals(stop.signum).name
        raise RunStopped(
            f"stopped by {name} before the end: {Path(config.train.output_dir) / 'last.pt'} "
            "holds the run; rerun the same command with train.resume=auto to continue it",
            signum=stop.signum,
        )
    return final


def teacher_source(config: Config) -> str:
    """The teacher as an error line names it: its model, and its file or hub tag."""
    teacher = config.teacher
    where = teacher.checkpoint or (teacher.pretrained_tag and f"tag {teacher.pretrained_tag}")
    return f"the teacher {teacher.name}" + (f" ({where})" if where else "")


def memory_failure(error: BaseException, config: Config) -> ResourceError | None:
    """One line for running out of memory (CUDA's OutOfMemoryError, or the CPU allocator's
    failure), with the batch size and the knobs that lower the memory a step needs; None for
    any other error. (The kernel's OOM killer ends a process without a word: a loader worker's
    death is reported by :func:`~cskd.data.sampling.worker_failure`.)"""
    text = str(error)
    if not (isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in text):
        return None
    where = "GPU" if isinstance(error, torch.OutOfMemoryError) else "CPU"
    return ResourceError(
        f"out of memory on the {where} ({text.splitlines()[0][:120]}) at "
        f"data.batch_size={config.data.batch_size} per process: lower data.batch_size (the "
        "learning rate follows the global batch), use train.amp=bf16, fewer data.workers or a "
        "smaller data.eval_batch_size; last.pt holds the run so far (train.resume=auto)"
    )


def _train(
    config: Config,
    info: distributed.DistributedInfo,
    stop: StopRequest,
    *,
    run: RunDirectory,
    global_batch: int,
    lr: float,
) -> dict:
    run_dir = run.path
    setup_logging(rank=info.rank, log_file=run_dir / "train.log")
    device = info.device
    seed_everything(config.train.seed)  # the same initial weights (and EMA) on every rank

    train_set, val_set = distributed.together(build_datasets, config.data, config.augment)
    sampler, loader, steps_per_epoch = build_train_loader(config, train_set, info)
    val_loader, test_loader = build_eval_loaders(config, val_set, info)

    fresh = resume_path(config.train, run_dir) is None  # a resumed run's weights come from last.pt
    student = distributed.together(build_student, config, initial_weights=fresh).to(device)
    teacher = distributed.together(build_teacher, config)
    # what the run's checkpoints record of the teacher: a resume refuses other weights
    teacher_digest = tensors_digest(teacher.state_dict()) if teacher is not None else None
    if teacher is not None:  # compiled after the pre-flight, whose batches have other shapes
        teacher = place_teacher(config, teacher, device, compile=False)
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
        config.optim, student, lr=lr, steps_per_epoch=steps_per_epoch
    )
    dtype = amp_dtype(config.train, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    erasing, mixup = build_batch_augmentation(config, device)
    student_norm = normalizer(config.data.mean, config.data.std, device)

    trained = wrap_for_training(config, student, info)  # DDP, compile
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
        is_main=info.is_main,
    )

    if info.is_main:  # warnings only once every check has passed (errors stay one line)
        preflight.check_machine(config, world_size=info.world_size)
    if teacher is not None and config.train.compile and not config.teacher.cache:
        # one compile, for the training batch (with a cache the teacher serves only the
        # pre-flight and diagnostics: not compiled)
        teacher.compile(backend=config.train.compile_backend)
    run.clear_previous(is_main=info.is_main)  # every input is read: the old run may go
    state = resume_run(
        config,
        run_dir,
        info,
        student=student,
        ema=ema,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        global_batch=global_batch,
        steps_per_epoch=steps_per_epoch,
        teacher_digest=teacher_digest,
    )
    metrics_writer = MetricsWriter(run_dir, enabled=info.is_main, resume_step=state.global_step)
    if info.is_main:
        write_text_atomic(run_dir / "config.yaml", dump_config(config))
    log.info(
        f"{config.distill.method} | student {config.student.name} | teacher "
        f"{config.teacher.name if teacher is not None else '-'} | {info.world_size} process(es) "
        f"on {device} | effective batch {global_batch} (= {config.data.batch_size} x {info.world_size}) | "
        f"lr {lr:.3g} "
        f"(= {config.optim.lr:g} x {global_batch} / {config.optim.lr_batch_reference}) | "
        f"{steps_per_epoch} steps/epoch x {config.optim.epochs} epochs"
    )

    class_names = [str(name) for name in getattr(train_set, "classes", None) or []]

    checkpoints = Checkpoints(
        config,
        run_dir=run_dir,
        is_main=info.is_main,
        student=student,
        ema=ema,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        state=state,
        global_batch=global_batch,
        steps_per_epoch=steps_per_epoch,
        class_names=class_names,
        teacher_digest=teacher_digest,
    )

    trainer = Trainer(
        distiller=distiller,
        optimizer=optimizer,
        scheduler=scheduler,
        device=device,
        epochs=config.optim.epochs,
        steps_per_epoch=steps_per_epoch,
        progress_unit=config.distill.progress,
        mixup=mixup,
        erasing=erasing,
        ema=ema,
        scaler=scaler,
        amp_dtype=dtype,
        clip_grad=config.optim.clip_grad,
        student_norm=student_norm,
        cached_teacher=cached_teacher,
        teacher_source=teacher_source(config),
    )
    evaluation = EpochEvaluation(
        config=config,
        student=student,
        ema=ema,
        teacher=teacher,
        val_loader=val_loader,
        test_loader=test_loader,
        device=device,
        student_norm=student_norm,
        amp_dtype=dtype,
        steps_per_epoch=steps_per_epoch,
        probe=diagnostics.Probe(
            val_set,
            count=config.train.diagnostics_images,
            student_norm=student_norm,
            schedule=config.distill.schedule,
        )
        if config.train.diagnostics and info.is_main
        else None,
    )
    loop = EpochLoop(
        config=config,
        trainer=trainer,
        evaluation=evaluation,
        state=state,
        writer=metrics_writer,
        stop=stop,
        checkpoints=checkpoints,
        run_dir=run_dir,
        show_progress=info.is_main and sys.stderr.isatty(),
    )
    final, test, finished = loop.run(loader, sampler)
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
            classes=class_names,
        )
    metrics_writer.close()
    return final


@dataclass
class EpochLoop:
    """The run's loop, beside the run's state: train, evaluate and checkpoint epoch after
    epoch, and decide what to log, when to save and when to stop (as torchvision's
    ``train_one_epoch`` / ``evaluate``). The step itself is :meth:`Trainer.step`."""

    config: Config
    trainer: Trainer
    evaluation: EpochEvaluation
    state: TrainState
    writer: MetricsWriter
    stop: StopRequest
    checkpoints: Checkpoints  # writes last.pt / best.pt (rank 0)
    run_dir: Path
    show_progress: bool = False

    @property
    def eval_extent(self) -> dict:
        """The validation split's size and ``train.eval_max_batches``, for the epoch line."""
        split_images = len(self.evaluation.val_loader.dataset)
        return {"split_images": split_images, "cap": self.config.train.eval_max_batches}

    def should_stop(self) -> bool:
        """A stop request (SIGTERM, Ctrl-C) or ``train.stop_after_steps``, agreed by all ranks so
        that they stop at the same step."""
        limit = self.config.train.stop_after_steps
        return distributed.any_rank(self.stop.requested) or 0 < limit <= self.state.global_step

    def run(self, loader, sampler: EpochSampler) -> tuple[dict, dict | None, bool]:
        """Epoch after epoch from ``state``; returns the last evaluation (validation, test or
        None) and whether the run reached its end (False: it stopped on request and
        ``last.pt`` holds it). A non-finite loss, weight or teacher output stops it with
        :class:`NonFiniteError`, whose line says which checkpoint holds the run."""
        try:
            return self._epochs(loader, sampler)
        except NonFiniteError as error:
            raise type(error)(f"{error}; {self.checkpoints.intact()}") from None

    def _epochs(self, loader, sampler: EpochSampler) -> tuple[dict, dict | None, bool]:
        config, state = self.config, self.state
        self.stop.held_by = self.checkpoints.intact
        final: dict = {}
        test: dict | None = None
        epochs, steps_per_epoch = config.optim.epochs, self.trainer.steps_per_epoch
        last = self.run_dir / "last.pt"
        while state.epoch < epochs:
            sampler.set_epoch(state.epoch, start=state.step_in_epoch * config.data.batch_size)
            train_means = self.train_one_epoch(loader)
            stopping = self.should_stop()
            if stopping and state.step_in_epoch < steps_per_epoch:
                self.checkpoints.save("last.pt")
                log.info(f"stop requested: saved {last} at step {state.global_step}")
                return final, test, False
            evaluated = (state.epoch + 1) % config.train.eval_interval == 0 or (
                state.epoch + 1 == epochs
            )
            record = {"type": "epoch", "epoch": state.epoch, "step": state.global_step}
            record["train"] = train_means
            if evaluated:
                record.update(self.evaluation.run(epoch=state.epoch))
                final, test = record["eval"], record.get("test")
                update_best(state.best, final, epoch=state.epoch)
            self.writer.write(record)
            shown = final if evaluated else {}
            log.info(epoch_line(state.epoch, epochs, train_means, shown, **self.eval_extent))
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
            if evaluated and rule_top1(final, config.train.best_rule) > state.best_metric:
                state.best_metric = rule_top1(final, config.train.best_rule)
                self.checkpoints.save("best.pt")
            self.checkpoints.save("last.pt")
            if stopping:
                log.info(f"stop requested: saved {last} after epoch {state.epoch}")
                return final, test, False
        if not final:  # resumed after the last epoch (killed while writing the outputs)
            measured = self.evaluation.run(epoch=state.epoch - 1, with_diagnostics=False)
            final, test = measured["eval"], measured.get("test")
        return final, test, True

    def train_one_epoch(self, batches: Iterable[dict]) -> dict:
        """Step until the epoch's steps are done or a stop is agreed; logs every
        ``train.log_interval`` steps, saves ``last.pt`` every ``train.checkpoint_interval``;
        returns the epoch's mean loss parts and ``epoch_time_s``."""
        trainer, state, train = self.trainer, self.state, self.config.train
        trainer.distiller.train()
        trainer.scheduler.step(state.epoch)  # an epoch-unit schedule moves here (per step: no-op)
        if state.step_in_epoch == 0:
            state.epoch_sums, state.epoch_steps = {}, 0
        sums = state.epoch_sums
        count = 0
        start, window_start, window_images = time.perf_counter(), time.perf_counter(), 0
        steps_per_epoch = trainer.steps_per_epoch
        remaining = max(steps_per_epoch - state.step_in_epoch, 0)
        bar = tqdm(
            total=remaining,
            desc=f"epoch {state.epoch + 1}/{trainer.epochs}",
            disable=not self.show_progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        for batch in itertools.islice(batches, remaining):
            parts = trainer.step(batch, state)
            self.stop.armed = True  # from now on a stop signal saves first
            count += 1
            state.epoch_steps += 1
            window_images += batch["image"].shape[0]
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            if (
                state.global_step % train.log_interval == 0
                or state.step_in_epoch == steps_per_epoch
            ):
                now = time.perf_counter()
                lr = trainer.optimizer.param_groups[0]["lr"]
                record = {
                    "type": "step",
                    "epoch": state.epoch,
                    "step": state.global_step,
                    "lr": lr,
                    "images_per_s": window_images / max(now - window_start, 1e-9),
                    **{k: float(v) for k, v in parts.items()},
                }
                window_start, window_images = now, 0
                if not trainer.weights_finite():  # before this step's checkpoint or any export
                    raise NonFiniteError(
                        f"the student's weights are not finite after step {state.global_step} "
                        f"(epoch {state.epoch}; loss {record['loss']:.4g}): lower optim.lr, set "
                        "optim.clip_grad or use bf16"
                    )
                self.writer.write(record)
                speed = f"{record['images_per_s']:.0f}"
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", img_s=speed, refresh=False
                )
                if not self.show_progress:  # not a terminal: one line per log interval
                    eta = (now - start) / count * (remaining - count)
                    log.info(
                        f"epoch {state.epoch + 1}/{trainer.epochs} step {state.step_in_epoch}/"
                        f"{steps_per_epoch} loss {record['loss']:.4f} lr {lr:.3g} "
                        f"{speed} img/s eta {eta:.0f}s"
                    )
            bar.update(1)
            if train.checkpoint_interval and state.global_step % train.checkpoint_interval == 0:
                self.checkpoints.save("last.pt")
            if self.should_stop():
                break
        bar.close()
        means = {key: value / max(state.epoch_steps, 1) for key, value in sums.items()}
        means["epoch_time_s"] = time.perf_counter() - start
        return means
