"""The run's models: the student and the frozen teacher built from a config with their initial
weights (a checkpoint or timm's hub), the teacher placed on its device, and an exported student
rebuilt from its file alone."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import timm
import torch
from torch import nn

from ..config import Config, TeacherConfig
from ..errors import CheckpointError, ConfigError, TeacherError
from ..infra.weights import (
    classifier_weights,
    init_from,
    load_adapted,
    read_export_metadata,
    read_state_dict,
    resolve_source,
)
from ..method.adapters import (
    DenseStudent,
    DenseTeacher,
    MapStudent,
    PlainClassifier,
    wrap_student,
)

log = logging.getLogger("cskd")


def build_student(config: Config, *, initial_weights: bool = False) -> torch.nn.Module:
    """The student, wrapped (:func:`~cskd.method.adapters.wrap_student`). With ``initial_weights`` (a
    fresh training run) it starts from ``student.checkpoint`` or ``student.pretrained_tag``,
    adapted by :func:`cskd.infra.weights.init_from`; ``student.trainable=head`` then freezes all but
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
    return wrap_student(
        model, inference_rule=config.student.inference_rule, method=config.distill.method
    )


def build_teacher(config: Config, *, method: str | None = None) -> DenseTeacher | None:
    """The frozen teacher that ``method`` (default ``distill.method``) needs, normalising its
    input with ``teacher.mean`` / ``teacher.std``: None for ``none``; for ``deit`` dense logits
    whenever its model can give them (they feed the diagnostics), else global logits only (a
    ViT); for ``cskd`` dense logits or :class:`~cskd.errors.TeacherError`. ``cskd cache`` asks
    for ``cskd``'s teacher, ``cskd diagnose`` for ``deit``'s."""
    method = method or config.distill.method
    if method == "none":
        return None
    if config.teacher.checkpoint and not Path(config.teacher.checkpoint).exists():
        raise CheckpointError(
            f"teacher.checkpoint {config.teacher.checkpoint} does not exist: check the path (a "
            "weights file or a cskd run directory; train the teacher first if it is one of yours)"
        )

    def load(global_only: bool) -> DenseTeacher:
        return load_teacher(
            config.teacher.name,
            config.teacher.checkpoint or None,
            num_classes=config.data.num_classes,
            pretrained_tag=config.teacher.pretrained_tag or None,
            global_only=global_only,
            image_size=config.data.image_size,
            mean=config.teacher.mean,
            std=config.teacher.std,
            **{"in_chans": config.data.in_chans, **config.teacher.kwargs},
        )

    if method == "cskd":
        return load(False)
    try:
        return load(False)
    except TeacherError:  # DeiT distillation needs only the global logits
        return load(True)


def place_teacher(
    config: Config, teacher: DenseTeacher, device: torch.device, *, compile: bool = True
) -> DenseTeacher:
    """The teacher on ``device`` at its precision (``teacher.amp``), channels-last where it helps
    (``teacher.memory_format``: ``auto`` on a GPU, where convolutions under autocast prefer it)
    and compiled with the student (``train.compile``)."""
    teacher = teacher.to(device)
    teacher.amp_dtype = teacher_amp_dtype(config.teacher, device)
    memory_format = config.teacher.memory_format
    if memory_format == "channels_last" or (memory_format == "auto" and device.type == "cuda"):
        teacher = teacher.to(memory_format=torch.channels_last)
        teacher.channels_last = True
    if config.train.compile and compile:
        teacher.compile(backend=config.train.compile_backend)
    return teacher


def teacher_amp_dtype(teacher: TeacherConfig, device: torch.device) -> torch.dtype:
    """The teacher's precision: ``auto`` is fp16 on a GPU (as the release runs its teacher, and
    10x fewer flipped hard targets than bf16, docs/results/teacher_precision.md), fp32 on CPU."""
    amp = teacher.amp
    if amp == "auto":
        amp = "fp16" if device.type == "cuda" else "fp32"
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def load_teacher(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    num_classes: int,
    pretrained_tag: str | None = None,
    global_only: bool = False,
    image_size: int = 64,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    **model_kwargs,
) -> DenseTeacher:
    """Build the timm model ``name`` with its weights and wrap it as a :class:`DenseTeacher`.

    ``checkpoint``: a weights file in any form :func:`cskd.infra.weights.extract_state_dict` reads
    (``.safetensors``, a state dict, DeiT's ``{"model": ...}``, timm's ``{"state_dict": ...}``,
    a cskd ``best.pt``) or a cskd run directory, read without unpickling code; another number of
    input channels is adapted, but its head must have the data's ``num_classes`` (else
    :class:`~cskd.errors.CheckpointError` pointing at the teacher-refit recipe). Without a
    checkpoint, ``pretrained_tag`` (e.g. ``deit_in1k``) asks timm's hub for weights.
    ``global_only``, ``image_size``, ``mean`` and ``std``: see :class:`DenseTeacher`
    (``global_only=True`` for DeiT distillation, which needs only global logits; ``image_size``
    is the data's; ``mean`` / ``std`` default to the timm model's pretrained configuration).
    A ``student.safetensors`` written by ``cskd train`` (or its run directory) supplies what it
    records and the call leaves out: the model's keyword arguments and its mean/std.
    """
    export = _export_of(checkpoint, name=name)
    if export is not None:
        saved = {k: v for k, v in export["model_kwargs"].items() if k != "num_classes"}
        model_kwargs = {**saved, **model_kwargs}
        mean = mean if mean is not None else tuple(export["mean"])
        std = std if std is not None else tuple(export["std"])
    if checkpoint:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **model_kwargs)
        try:
            lines = init_from(model, checkpoint, what=f"teacher {name}", adapt_head=False)
            for line in lines[1:]:  # the adaptations (the file is named in the config)
                log.info(line)
        except CheckpointError as error:
            if "-class head" not in str(error):
                raise
            raise CheckpointError(
                f"{error}; a teacher must know the data's classes: refit it on your data first "
                "(configs/finetune/teacher_resnet50.yaml or teacher_regnety_160.yaml; at CPU scale "
                "fashion_mnist_teacher_refit.yaml; README 'Your own data')"
            ) from None
    elif pretrained_tag:
        model = create_pretrained(
            name,
            pretrained_tag,
            what="teacher",
            num_classes=num_classes,
            adapt_head=False,
            **model_kwargs,
        )
    else:
        raise TeacherError(
            f"teacher {name} has no weights: set teacher.checkpoint to a local file or "
            "teacher.pretrained_tag to a timm tag (e.g. deit_in1k)"
        )
    return DenseTeacher(
        model,
        name=name,
        global_only=global_only,
        check_size=image_size,
        mean=mean,
        std=std,
        in_chans=model_kwargs.get("in_chans"),
    )


def _export_of(checkpoint: str | os.PathLike | None, *, name: str) -> dict | None:
    """The cskd export metadata of ``checkpoint`` when it is an exported ``name``, else None."""
    if not checkpoint:
        return None
    source = resolve_source(checkpoint)
    export = read_export_metadata(source) if source.suffix == ".safetensors" else None
    return export if export is not None and export["timm_name"] == name else None


def create_pretrained(
    name: str,
    tag: str,
    *,
    what: str,
    num_classes: int,
    reset_head: bool = False,
    adapt_head: bool = True,
    **kwargs,
) -> nn.Module:
    """``timm.create_model(f"{name}.{tag}", pretrained=True, ...)``: timm fetches the weights from
    its hub and adapts a head of another class count, input channels and position embeddings
    itself; each adaptation is logged. ``reset_head`` re-initialises heads whose size fits;
    ``adapt_head=False`` (a teacher) refuses weights for other classes. Raises
    :class:`~cskd.errors.CheckpointError` for that, an unknown tag or a failed fetch (no
    network)."""
    full = f"{name}.{tag}"
    try:
        saved = timm.models.get_pretrained_cfg(full, allow_unregistered=False)
    except RuntimeError as error:
        raise CheckpointError(
            f"{what}.pretrained_tag: {error} (timm.list_pretrained('{name}*') lists the tags)"
        ) from None
    saved_classes = saved.num_classes if saved is not None else num_classes
    if saved_classes != num_classes and not adapt_head:
        raise CheckpointError(
            f"timm's {full} weights have a {saved_classes}-class head but the data has "
            f"{num_classes} classes; a teacher must know the data's classes: refit it on your "
            "data first (configs/finetune/teacher_resnet50.yaml or teacher_regnety_160.yaml; "
            "README 'Your own data')"
        )
    try:
        model = timm.create_model(full, pretrained=True, num_classes=num_classes, **kwargs)
    except Exception as error:  # noqa: BLE001 - hub, network and file errors: one line each
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(
            f"could not get timm's {full} weights for the {what} ({reason[:200]}): without a "
            f"network download them elsewhere and set {what}.checkpoint to the file"
        ) from None
    log.info(f"{what} {name}: initialised from timm's {full}")
    heads = ", ".join(key.rsplit(".", 1)[0] for key, _ in classifier_weights(model))
    if saved_classes != num_classes:
        log.info(
            f"{what} {name}: re-initialised {heads} (timm's weights have {saved_classes} "
            f"classes, the model {num_classes})"
        )
    elif reset_head:
        model.reset_classifier(num_classes)
        log.info(f"{what} {name}: re-initialised {heads} (reset_head: a new label set)")
    size = kwargs.get("img_size")
    if size is not None and saved is not None and saved.input_size[-1] != size:
        log.info(
            f"{what} {name}: timm resampled the position embeddings from "
            f"{saved.input_size[-1]} px to {size} px"
        )
    return model


def load_student(
    path: str | os.PathLike, *, image_size: int | None = None
) -> DenseStudent | MapStudent | PlainClassifier:
    """Rebuild an exported student from its file alone: ``student.safetensors`` (or the run
    directory holding it) carries the timm name, keyword arguments, classes, input size,
    normalisation and inference rule (:func:`cskd.infra.weights.export_metadata`), kept on the
    result as ``.export``. ``image_size`` builds a ViT for another input size, its position
    embeddings resampled as timm does. ``student(images)`` then takes (N, C, S, S) images
    normalised with ``.export["mean"]``/``["std"]``; ``.predict`` gives (N, K) logits under
    the saved rule. Raises :class:`~cskd.errors.CheckpointError` for a file without cskd
    metadata."""
    source = resolve_source(path)
    export = read_export_metadata(source) if source.suffix == ".safetensors" else None
    if export is None:
        raise CheckpointError(
            f"{source} carries no cskd export metadata (only student.safetensors written by "
            "cskd train does): build the model with timm.create_model and load the weights"
        )
    state, _ = read_state_dict(source)
    kwargs = dict(export["model_kwargs"])
    if image_size and "pos_embed" in state:
        kwargs["img_size"] = image_size
    model = timm.create_model(export["timm_name"], pretrained=False, **kwargs)
    student = wrap_student(
        model, inference_rule=export["inference_rule"], method=export.get("method", "deit")
    )
    own = {}  # a MapStudent's distillation head: not the timm model's
    if isinstance(student, MapStudent):
        own = {k: state.pop(k) for k in list(state) if k.startswith(MapStudent.OWN_KEYS)}
    for line in load_adapted(model, state, path=source, what="student", adapt_head=False):
        log.info(line)
    if own:
        student.load_state_dict({**student.state_dict(), **own})
    if image_size:
        export = {**export, "input_size": [export["input_size"][0], image_size, image_size]}
    student.export = export
    return student
