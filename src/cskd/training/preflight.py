"""Checks that run before training starts, so that a bad input costs seconds, not a run.

A 300-epoch run should not die at step 10,000 on a corrupt JPEG, nor train for days against a
teacher that guesses. ``train`` calls :func:`check_data_source` before the datasets are built,
:func:`check_resume` before a checkpoint is loaded and :func:`check_run` once the models are built,
all before the first step. Other bad inputs are refused where the thing is built, just as early:

============================================================  ===================================
bad input                                                     refused by
============================================================  ===================================
unknown config key, wrong type, out-of-range value            ``config.load_config``
library-set key inside kwargs (num_classes, in_chans, ...)    ``config.load_config``
unknown timm model name, unknown model keyword argument       :func:`check_models`
unknown optimizer name                                        :func:`check_optimizer_name`
cskd student with no patch grid or final map (XCiT, PiT)       :func:`check_models`
output directory holding another run (no resume/overwrite)    ``training.rundir.prepare_run_dir``
empty output directory, or one that is or holds an input      ``training.rundir.check_output_dir``
missing or empty data directory                               :func:`check_data_source`
class folders that differ between train and val               ``data.check_class_folders``
data.num_classes unlike the data's classes                    ``data.build_datasets``
missing, unreadable or code-carrying checkpoint               ``infra.checkpoint.read_file``
checkpoint of another architecture or number of classes       ``infra.weights.check_state_fits``
initial weights that cannot be adapted (depth, width)         ``infra.weights.init_from``
teacher file whose classes are not the data's                 ``training.models.load_teacher``
                                                              (names the refit recipe)
timm hub weights that cannot be fetched (offline, bad tag)    ``training.models.create_pretrained``
teacher mean/std of another channel count                     ``config.load_config``
teacher head that cannot give dense logits (ConvNeXt)         ``method.adapters.DenseTeacher``
student built for another image size                          :func:`check_student_input`
student grid smaller than the teacher's                       :func:`check_run` (``align``)
corrupt or truncated image                                    :func:`check_images`
teacher near chance on a validation slice                     :func:`check_teacher_accuracy` (a
                                                              warning, not an error)
============================================================  ===================================

Each raises with a one-line message naming the file, key or numbers and the fix; the CLI prints
it and exits with status 2.

How much is scanned for corrupt images: every image of a split with at most
:data:`SCAN_LIMIT` files is fully decoded (in ``data.workers`` threads); a larger split has an
evenly spaced sample of :data:`SCAN_LIMIT` decoded, which finds systematic damage (a truncated
copy, a wrong format) in seconds to a minute, and the rest is checked as it is read: the
dataset raises naming the file, or skips it under ``data.skip_corrupt``.
"""

from __future__ import annotations

import difflib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from ..config import Config, DataConfig
from ..errors import ConfigError, DataError
from ..infra.weights import check_state_fits
from ..method.adapters import (
    DenseStudent,
    DenseTeacher,
    DistilledStudent,
    is_vit,
    map_student_problem,
    patch_logits_problem,
)
from ..method.align import check_grids

log = logging.getLogger("cskd")

SCAN_LIMIT = 10_000  # images per split fully decoded by the pre-flight (all of a smaller split)
TEACHER_SLICE = 256  # validation images the teacher is measured on
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def check_models(config: Config) -> None:
    """Refuse, before anything is built, a model name timm does not know or a keyword argument
    the model does not take (naming the nearest valid ones), and a student that cannot give
    patch logits under ``distill.method=cskd``. Builds the models on the meta device: no memory,
    no weights, no arithmetic."""
    student = _meta_model(
        "student",
        config.student.name,
        config.student.kwargs,
        defaults={
            "num_classes": config.data.num_classes,
            "in_chans": config.data.in_chans,
            "drop_path_rate": config.student.drop_path,
        },
    )
    teacher = None
    if config.distill.method != "none":
        teacher = _meta_model(
            "teacher",
            config.teacher.name,
            config.teacher.kwargs,
            defaults={"num_classes": config.data.num_classes, "in_chans": config.data.in_chans},
        )
    check_optimizer_name(config.optim.name)
    for section, model in (("student", student), ("teacher", teacher)):
        if model is not None and no_classifier(model):
            raise ConfigError(
                f"{section}.name={getattr(config, section).name} builds no classifier head (timm "
                f"gives it num_classes=0: an encoder): a {section} must give data.num_classes="
                f"{config.data.num_classes} logits; choose a classifier (e.g. the family's "
                "model without _enc)"
            )
    if config.train.compile:
        check_compile_backend(config.train.compile_backend)
    if student is None or config.distill.method != "cskd":
        return
    if not is_vit(student):  # a hierarchical or convolutional student: a MapStudent
        problem = map_student_problem(student, config.data.image_size, config.data.in_chans)
        if problem is not None:
            raise ConfigError(
                f"distill.method=cskd needs dense student logits, but student.name="
                f"{config.student.name}: {problem}; use a model that ends in a feature map "
                "(Swin, PVTv2, MaxViT, ConvNeXt, a ViT), or distill.method=deit"
            )
        return
    problem = patch_logits_problem(student)
    if problem is not None:
        raise ConfigError(
            f"distill.method=cskd needs patch logits, but student.name={config.student.name}: "
            f"{problem}; use a ViT with a patch grid (ViT, DeiT, EVA, BEiT, CaiT), or "
            "distill.method=deit (it trains this student on its class token)"
        )


def check_optimizer_name(name: str) -> None:
    """Refuse an optimizer timm's factory does not know (it reads the part after the last
    ``_``: ``lookahead_adamw`` is AdamW under Lookahead), naming the nearest ones."""
    from timm.optim import list_optimizers

    known = list_optimizers()
    if name.lower().split("_")[-1] in known:
        return
    near = difflib.get_close_matches(name.lower(), known, n=3)
    raise ConfigError(
        f"optim.name {name} is not a timm optimizer"
        + (f" (did you mean {', '.join(near)}?)" if near else "")
        + ": see timm.optim.list_optimizers()"
    )


def check_student_grid(
    student: DistilledStudent, teacher: DenseTeacher, image_size: int, name: str
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The student's and the teacher's grids (rows, columns) at ``image_size`` px; raises
    :class:`~cskd.errors.GridError` when the student's patch grid or final map (then named by
    ``name``, the student's model) is coarser than the teacher's map (CSKD pools the student's
    onto the teacher's, never the reverse)."""
    grid, teacher_grid = student.grid(image_size), teacher.grid(image_size)
    kind = "" if isinstance(student, DenseStudent) else f"{name}'s final feature map at"
    check_grids(grid, teacher_grid, student_map=kind and f"{kind} {image_size} px")
    return grid, teacher_grid


def no_classifier(model: torch.nn.Module) -> bool:
    """True for a timm model built with a num_classes it ignores: an encoder without a head."""
    return getattr(model, "num_classes", None) == 0


def check_compile_backend(backend: str) -> None:
    """ConfigError naming ``train.compile_backend`` unless torch.compile knows ``backend``."""
    from torch._dynamo import list_backends

    if backend not in list_backends(exclude_tags=()):
        raise ConfigError(
            f"train.compile_backend={backend!r} is not a torch.compile backend: use one of "
            f"{', '.join(list_backends())} (or eager, to trace without code generation)"
        )


def _meta_model(section: str, name: str, kwargs: dict, *, defaults: dict):
    """The timm model built on the meta device, or None when it cannot be built there for a
    reason other than its name or keyword arguments (then the real build reports it)."""
    import difflib
    import re

    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.75)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"
        raise ConfigError(f"{section}.name={name!r} is not a timm model: {hint}")
    arguments = {**defaults, **kwargs}
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **arguments)
    except TypeError as error:
        found = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        if found is None:
            raise ConfigError(f"{section}.kwargs do not build {name}: {error}") from None
        bad = found.group(1)
        valid = _accepted_arguments(name, defaults)
        close = difflib.get_close_matches(bad, valid, n=2, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else f"it takes {', '.join(valid)}"
        raise ConfigError(
            f"{section}.kwargs.{bad}: {name} takes no argument {bad!r}; {hint}"
        ) from None
    except Exception:  # noqa: BLE001 - some models cannot be built on meta; the real build will say
        return None


def _accepted_arguments(name: str, defaults: dict) -> list[str]:
    """The keyword arguments of the model class behind the timm name ``name``."""
    import inspect

    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **defaults)
    except Exception:  # noqa: BLE001
        return []
    names: set[str] = set()
    for cls in type(model).__mro__:  # subclasses often pass **kwargs on to their base
        if "__init__" in vars(cls) and cls is not torch.nn.Module and cls is not object:
            for parameter in inspect.signature(cls.__init__).parameters.values():
                if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                    names.add(parameter.name)
    names.discard("self")
    return sorted(names)


def check_machine(config: Config, *, world_size: int) -> list[str]:
    """Warn (and return the warnings) where defaults sized for an 8-GPU ImageNet run do not fit
    this machine: more loader workers than CPU cores, and repeated augmentation on one process
    (each epoch then shows about a third of the images, three copies of each)."""
    warnings = []
    cores = os.cpu_count() or 1
    if config.data.workers > cores:
        warnings.append(
            f"data.workers={config.data.workers} exceeds the {cores} CPU cores of this machine: "
            f"the loaders will compete with training; set data.workers={max(cores - 1, 0)}"
        )
    if config.augment.repeated_aug and world_size == 1:
        warnings.append(
            "augment.repeated_aug=true on one process: each epoch shows about a third of the "
            "images, three augmented copies of each (DeiT uses it across 8 GPUs); set "
            "augment.repeated_aug=false for a single-process run"
        )
    for warning in warnings:
        log.warning(f"pre-flight: {warning}")
    return warnings


def check_data_source(data: DataConfig) -> None:
    """Refuse a missing or empty ``data.root`` with one line saying what should be there."""
    fashion = data.dataset in ("fashion_mnist", "translated_fashion_mnist")
    if data.dataset == "synthetic" or (fashion and not data.root):
        return
    root = Path(data.root)
    layout = "train/<class>/<image> and val/<class>/<image>"
    if fashion:
        layout = 'the Fashion-MNIST *-ubyte.gz files (or data.root="" for the Debian package)'
        if data.download:
            return
    if not data.root:
        raise DataError(f"data.dataset={data.dataset} needs data.root: the folder holding {layout}")
    if not root.exists():
        raise DataError(f"data.root {root} does not exist: set it to the folder holding {layout}")
    if not root.is_dir():
        raise DataError(
            f"data.root {root} is not a directory: set it to the folder holding {layout}"
        )
    if not any(os.scandir(root)):
        raise DataError(f"data.root {root} is empty: it should hold {layout}")


def check_resume(
    checkpoint: dict, *, path: str | os.PathLike, config: Config, student, ema=None
) -> None:
    """Refuse a training checkpoint whose student (or EMA) weights do not fit the built model."""
    what = f"student {config.student.name}"
    check_state_fits(checkpoint["student"], student, path=path, what=what)
    if ema is not None and checkpoint.get("ema") is not None:
        check_state_fits(checkpoint["ema"], ema.module, path=path, what=f"EMA of the {what}")


def check_student_input(student: torch.nn.Module, *, image_size: int, name: str) -> None:
    """Refuse a ViT student built for another input size than ``data.image_size``."""
    model = getattr(student, "model", student)
    patch_embed = getattr(model, "patch_embed", None)
    built = getattr(patch_embed, "img_size", None)
    if built is None or getattr(model, "dynamic_img_size", False):
        return
    if tuple(built) != (image_size, image_size):
        raise ConfigError(
            f"student {name} is built for {built[0]}x{built[1]} px images but data.image_size is "
            f"{image_size}: set student.kwargs.img_size={image_size} (or data.image_size="
            f"{built[0]})"
        )


def check_images(
    dataset: Dataset, *, split: str, skip_corrupt: bool, workers: int, limit: int | None = None
) -> int:
    """Decode the split's image files (all, or an evenly spaced ``limit`` of them); raise
    :class:`DataError` naming the first corrupt one, or, with ``skip_corrupt``, log how many will
    be skipped. Returns the number found corrupt. In-memory datasets have nothing to scan."""
    paths = getattr(dataset, "paths", None)
    if not paths:
        return 0
    limit = SCAN_LIMIT if limit is None else limit
    if len(paths) > limit:
        paths = [paths[i] for i in torch.linspace(0, len(paths) - 1, limit).long().tolist()]
    log.info(f"pre-flight: checking {len(paths)} {split} images")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(pool.map(_decode_error, paths))
    corrupt = [(path, reason) for path, reason in zip(paths, reasons) if reason is not None]
    checked = f"{len(paths)} {split} images checked"
    if corrupt and not skip_corrupt:
        path, reason = corrupt[0]
        others = f" ({len(corrupt)} of the {checked} are unreadable)" if len(corrupt) > 1 else ""
        raise DataError(
            f"corrupt or truncated image {path} ({reason}){others}: delete or replace it, or set "
            "data.skip_corrupt=true to skip unreadable images"
        )
    if corrupt:
        log.warning(
            f"pre-flight: {len(corrupt)} corrupt image(s) of the {checked} will be skipped "
            f"(data.skip_corrupt=true), e.g. {corrupt[0][0]}"
        )
    else:
        log.info(f"pre-flight: {checked}, none corrupt")
    return len(corrupt)


def _decode_error(path: str) -> str | None:
    try:
        with Image.open(path) as image:
            image.load()
    except _IMAGE_ERRORS as error:
        return str(error).replace("\n", " ") or type(error).__name__
    return None


def chance_threshold(num_classes: int) -> float:
    """Top-1 (percent) below which a teacher counts as near chance: twice chance, or halfway from
    chance to 100% when that is lower (two or three classes)."""
    chance = 100.0 / num_classes
    return min(2 * chance, (100.0 + chance) / 2)


@torch.no_grad()
def check_teacher_accuracy(
    teacher: DenseTeacher,
    val_set: Dataset,
    *,
    num_classes: int,
    batch_size: int,
    device: torch.device,
    student_norm: tuple[torch.Tensor, torch.Tensor],
    limit: int = TEACHER_SLICE,
) -> float:
    """The teacher's top-1 (percent) on up to ``limit`` evenly spaced validation images, logged;
    a warning when it is near chance (:func:`chance_threshold`), the commonest silent failure
    of distillation (wrong checkpoint, normalisation or class order)."""
    count = min(limit, len(val_set))
    indices = torch.linspace(0, len(val_set) - 1, count).round().long().unique().tolist()
    loader = DataLoader(Subset(val_set, indices), batch_size=batch_size, shuffle=False)
    correct = seen = 0
    for batch in loader:
        mean, std = student_norm  # normalised as training does, then the teacher's renormalisation
        images = teacher.renormalize((batch["image"].to(device) - mean) / std, mean=mean, std=std)
        predicted = teacher(images).global_logits.argmax(dim=1).cpu()  # (N,)
        correct += int((predicted == batch["target"]).sum())
        seen += len(predicted)
    top1 = 100.0 * correct / max(seen, 1)
    chance = 100.0 / num_classes
    measured = f"teacher {teacher.name} top-1 {top1:.1f}% on {seen} validation images"
    if top1 < chance_threshold(num_classes):
        log.warning(
            f"pre-flight: {measured}, near chance ({chance:.1f}%): it would teach noise - check "
            "teacher.checkpoint, teacher.mean/std and that its classes are in the data's order"
        )
    else:
        log.info(f"pre-flight: {measured} (chance {chance:.1f}%)")
    return top1


def check_run(
    config: Config,
    *,
    student: torch.nn.Module,
    teacher: DenseTeacher | None,
    train_set: Dataset,
    val_set: Dataset,
    device: torch.device,
    student_norm: tuple[torch.Tensor, torch.Tensor],
    is_main: bool = True,
) -> None:
    """The checks that need the built datasets and models, cheapest first. Only the main process
    scans images and runs the teacher (call it on every rank through ``distributed.together``)."""
    check_student_input(student, image_size=config.data.image_size, name=config.student.name)
    if not is_main:
        return
    # (a teacher of another class count never gets here: build_teacher creates the model for
    # data.num_classes and weights.check_state_fits names a head of another size)
    if teacher is not None:
        if config.distill.method == "cskd" and isinstance(student, DistilledStudent):
            size = config.data.image_size
            grid, teacher_grid = check_student_grid(student, teacher, size, config.student.name)
            log.info(
                f"pre-flight: student grid {grid[0]} x {grid[1]} "
                f"pooled to the teacher grid {teacher_grid[0]} x {teacher_grid[1]}"
            )
            if teacher_grid == (1, 1):
                log.warning(
                    f"pre-flight: the teacher grid is 1 x 1 at {size} px, so there is nothing "
                    "local to distil: CSKD then equals a global-target loss at every patch. Use "
                    "a teacher with a finer map (e.g. teacher.kwargs.output_stride=8) or a "
                    "larger data.image_size"
                )
    for split, dataset in (("train", train_set), ("val", val_set)):
        check_images(
            dataset,
            split=split,
            skip_corrupt=config.data.skip_corrupt,
            workers=config.data.workers,
        )
    if teacher is not None:
        check_teacher_accuracy(
            teacher,
            val_set,
            num_classes=config.data.num_classes,
            batch_size=config.data.eval_batch_size or 2 * config.data.batch_size,
            device=device,
            student_norm=student_norm,
        )
