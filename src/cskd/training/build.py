"""The run's other factories: the optimizer and schedule, the loaders, the batch augmentation
on the device, the distiller, precision and seeds (the models: :mod:`cskd.training.models`)."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from ..config import Config, OptimConfig, TrainConfig
from ..data import build_test_set
from ..data.sampling import EpochSampler, eval_loader, train_loader
from ..errors import ConfigError
from ..infra import distributed
from ..method.adapters import DenseTeacher
from ..method.distiller import Distiller, normalizer
from ..method.losses import ObjectiveWeights

log = logging.getLogger("cskd")


def scaled_lr(optim: OptimConfig, global_batch: int) -> float:
    """The recipe's learning rate scaled linearly to the global batch."""
    return optim.lr * global_batch / optim.lr_batch_reference


def check_lr_schedule(optim: OptimConfig, global_batch: int) -> float:
    """The peak learning rate for ``global_batch``; ConfigError if the warm-up start or the floor
    of the cosine (not scaled with the batch, as in DeiT) reaches it, which would make the
    "decay" climb (a small batch or a fine-tuning lr can put the peak under 1e-5)."""
    lr = scaled_lr(optim, global_batch)
    shown = (
        f"the peak learning rate {lr:.3g} (= optim.lr {optim.lr:g} x {global_batch} "
        f"images / optim.lr_batch_reference {optim.lr_batch_reference})"
    )
    if optim.min_lr >= lr:
        raise ConfigError(
            f"optim.min_lr={optim.min_lr:g} is not below {shown}, so the cosine schedule "
            "would rise instead of decay: lower optim.min_lr (e.g. to a hundredth of the peak), "
            "or raise optim.lr (or lower optim.lr_batch_reference)"
        )
    if optim.warmup_epochs and optim.warmup_lr > lr:
        raise ConfigError(
            f"optim.warmup_lr={optim.warmup_lr:g} is above {shown}, so the warm-up would "
            "go down: lower optim.warmup_lr or raise optim.lr"
        )
    return lr


def build_optimization(
    optim: OptimConfig, student: torch.nn.Module, *, lr: float, steps_per_epoch: int
):
    """AdamW (or any timm optimizer) without weight decay on norms, biases and tokens; cosine
    with warm-up, updated every step or (``optim.schedule_unit=epoch``, as DeiT) every epoch."""
    optimizer = create_optimizer_v2(
        student.model, opt=optim.name, lr=lr, weight_decay=optim.weight_decay
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=optim.epochs,
        warmup_epochs=optim.warmup_epochs,
        warmup_lr=optim.warmup_lr,
        min_lr=optim.min_lr,
        step_on_epochs=optim.schedule_unit == "epoch",
        updates_per_epoch=steps_per_epoch,
    )
    return optimizer, scheduler


def build_train_loader(config: Config, train_set, info: distributed.DistributedInfo):
    """The training sampler (per-sample seeds, this rank's share, DeiT's repeated augmentation),
    its loader (workers persist; each epoch iterates it anew after ``sampler.set_epoch``) and
    the optimisation steps per epoch (``train.max_steps_per_epoch`` caps them)."""
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
    loader = train_loader(
        train_set,
        sampler,
        batch_size=batch_size,
        workers=config.data.workers,
        pin_memory=info.device.type == "cuda",
        prefetch_factor=config.data.prefetch_factor,
    )
    return sampler, loader, steps_per_epoch


def wrap_for_training(
    config: Config, student: torch.nn.Module, info: distributed.DistributedInfo
) -> torch.nn.Module:
    """The student as the step calls it: in DDP under torchrun (the teacher is never wrapped),
    compiled with ``train.compile``."""
    trained = student
    if info.enabled:
        device = info.device
        trained = torch.nn.parallel.DistributedDataParallel(
            student,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.distill.method == "none",
        )
    if config.train.compile:
        trained = torch.compile(trained, backend=config.train.compile_backend)
    return trained


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
    ).to(device)


def amp_dtype(train: TrainConfig, device: torch.device) -> torch.dtype | None:
    amp = train.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
