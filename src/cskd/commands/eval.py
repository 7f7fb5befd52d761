"""``cskd eval``: the metrics of saved weights (a checkpoint, a run directory or an exported
student) under every inference rule.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from timm.utils import ModelEmaV3
from torch.utils.data import Dataset
from tqdm import tqdm

from ..config import Config, apply_overrides, from_dict
from ..data import build_eval_set
from ..data.sampling import eval_loader
from ..errors import CheckpointError, DataError
from ..infra import distributed
from ..infra.runlog import setup_logging
from ..infra.weights import (
    check_finite,
    load_adapted,
    read_export_metadata,
    read_state_dict,
    resolve_source,
)
from ..method.adapters import rules_for
from ..method.distiller import normalizer
from ..training import preflight
from ..training.build import amp_dtype
from ..training.evaluation import evaluate_with_ema
from ..training.models import build_student
from ..training.state import read_checkpoint

log = logging.getLogger("cskd")

# A saved run is evaluated under every rule; its rules resolve from its method, so that runs
# saved before `auto` (e.g. deit with cls+dist+patch) still load.
RULES_FOR_SAVED = ["student.inference_rule=auto", "train.best_rule=auto"]
# cskd eval scores the whole split, whatever cap the run's per-epoch evaluation had
WHOLE_SPLIT = ["train.eval_max_batches=0"]


def read_saved(checkpoint_path: str | Path) -> tuple[Path, dict, dict, dict | None]:
    """The file to evaluate (a run directory means its ``last.pt``, else its exported student),
    its config (a dict), its weights ``{"student", "ema" (or None), "class_names" (the training
    classes in label order, or None for a checkpoint saved before they were recorded)}`` and, for
    an exported student, its metadata. :class:`~cskd.errors.CheckpointError` for a
    ``.safetensors`` file that cskd did not write."""
    path = Path(checkpoint_path)
    if path.is_dir():
        path = path / "last.pt" if (path / "last.pt").is_file() else resolve_source(path)
    exported = read_export_metadata(path) if path.suffix == ".safetensors" else None
    if exported is not None:
        state, _ = read_state_dict(path)
        states = {"student": state, "ema": None, "class_names": exported["class_names"]}
        return path, config_of_export(exported), states, exported
    if path.suffix == ".safetensors":
        raise CheckpointError(
            f"{path} carries no cskd export metadata: evaluate a training checkpoint (last.pt) "
            "or a student.safetensors written by cskd train"
        )
    checkpoint = read_checkpoint(path)
    states = {
        "student": checkpoint["student"],
        "ema": checkpoint.get("ema"),
        "class_names": checkpoint.get("class_names"),
    }
    for weights in (states["student"], states["ema"] or {}):
        check_finite(weights, path=path)
    return path, checkpoint["config"], states, None


class ShowProgress:
    """``loader`` with a progress bar on stderr (rank 0) each time it is iterated."""

    def __init__(self, loader, *, enabled: bool) -> None:
        self.loader, self.enabled = loader, enabled

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(tqdm(self.loader, desc="evaluating", unit="batch", disable=not self.enabled))


def class_key(name: str) -> str:
    """A class name as matched by name: case and everything but letters and digits dropped, so
    that a folder ``T-shirt_top`` is the class ``T-shirt/top`` (a ``/`` cannot name a folder)."""
    return "".join(character for character in name.casefold() if character.isalnum())


def key_for(model_classes: list[str]):
    """:func:`class_key`, or the exact name when two of the model's names share a key."""
    return class_key if len(set(map(class_key, model_classes))) == len(model_classes) else str


class ClassesByName(Dataset):
    """``dataset`` with each target renumbered to the model's label of the same class name
    (compared by :func:`class_key` unless two of the model's names share a key):
    ``self[i]["target"]`` is the model's label of the class
    ``dataset.classes[dataset[i]["target"]]``."""

    def __init__(self, dataset: Dataset, model_classes: list[str]) -> None:
        self.dataset = dataset
        self.classes = list(model_classes)
        key = key_for(self.classes)
        labels = {key(name): label for label, name in enumerate(self.classes)}
        self.mapping = [labels[key(name)] for name in dataset.classes]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        sample["target"] = self.mapping[sample["target"]]
        return sample


def class_difference(trained: list[str], found: list[str]) -> str:
    """How the data's classes ``found`` differ from the model's ``trained`` (both in label
    order), for a message: the first few missing and extra names, or the first label whose name
    differs; "" when they are the same list."""
    if trained == found:
        return ""
    missing = [name for name in trained if name not in found]
    extra = [name for name in found if name not in trained]
    parts = (
        [f"missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}"] if missing else []
    )
    parts += [f"extra {', '.join(extra[:3])}{'...' if len(extra) > 3 else ''}"] if extra else []
    if not parts:
        label = next(i for i, (a, b) in enumerate(zip(trained, found, strict=True)) if a != b)
        parts = [f"label {label} is {trained[label]!r} in the model but {found[label]!r} here"]
    return "; ".join(parts)


def match_classes(
    dataset: Dataset, trained: list[str] | None, *, by_name: bool, num_classes: int, path: Path
) -> tuple[Dataset, dict | None]:
    """The dataset to score and, when matched by name, what the report says about it.

    The data's classes must be the model's, in the same label order; else
    :class:`~cskd.errors.DataError` naming the first differences. ``by_name`` scores a data
    set whose classes are some of the model's, each image under the model's label of its class
    name. ``trained`` None or empty (a checkpoint saved before class names were recorded): only the
    number of classes can be checked."""
    found = [str(name) for name in getattr(dataset, "classes", None) or []]
    if not trained:
        log.warning("this checkpoint predates recorded class names: only their number is checked")
        if len(found) != num_classes:
            raise DataError(
                f"{path} has {num_classes} classes but the data has {len(found)}: evaluate on "
                "data with the model's classes"
            )
        return dataset, None
    difference = class_difference(trained, found)
    if not difference:
        return dataset, None
    key = key_for(trained)
    unknown = [name for name in found if key(name) not in set(map(key, trained))]
    if by_name and not unknown:
        log.warning(f"classes matched by name: {len(found)} of the model's {len(trained)}")
        return ClassesByName(dataset, trained), {"matched_by_name": found, "of": len(trained)}
    if by_name:
        raise DataError(
            f"--classes-by-name: the data's classes {', '.join(unknown[:3])} are not among the "
            f"{len(trained)} classes of {path}: leave them out of data.root"
        )
    raise DataError(
        f"the data's classes differ from those of {path} ({difference}): evaluate on data with the "
        "model's class names, or pass --classes-by-name to score each image under the model's "
        "label of its class name (every data class must be one of the model's)"
    )


def evaluate_checkpoint(
    config: Config | list[str] | None,
    checkpoint_path: str | Path,
    *,
    classes_by_name: bool = False,
) -> dict:
    """Metrics of saved weights under every rule (and of their EMA weights, when saved).

    ``checkpoint_path``: a cskd training checkpoint (``last.pt``, ``best.pt``), a run directory
    (its ``last.pt``, else its exported student) or an exported ``student.safetensors``, whose
    metadata rebuilds the model. ``config``: a Config, or ``key=value`` overrides of the
    checkpoint's own config (an exported student's: its model and normalisation, with
    ``data.dataset=folder``, so ``data.root=FOLDER`` is all it needs; only ``val/`` is read).
    ``data.image_size`` may differ from training: a ViT's position embeddings are resampled.
    The data's class names must be the model's (:func:`match_classes`; ``classes_by_name``
    scores a subset of them by name, and the result's ``"classes"`` says so).
    """
    path, saved_config, states, exported = read_saved(checkpoint_path)
    if config is None or isinstance(config, list):  # the saved config, plus overrides
        overrides = [*RULES_FOR_SAVED, *WHOLE_SPLIT, *(config or [])]
        config = from_dict(apply_overrides(saved_config, overrides))
    if "pos_embed" in states["student"]:  # a ViT: built for the size it is evaluated at
        config.student.kwargs = {**config.student.kwargs, "img_size": config.data.image_size}
    info = distributed.init_distributed(
        device=config.train.device,
        backend=config.train.dist_backend,
        timeout_s=config.train.dist_timeout_s,
    )
    setup_logging(rank=info.rank)  # what was adapted (another image size) goes to stderr
    device = info.device
    val_set = build_eval_set(config.data, config.augment, check_num_classes=False)
    val_set, matched = match_classes(
        val_set,
        states["class_names"],
        by_name=classes_by_name,
        num_classes=config.data.num_classes,
        path=path,
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
    weights = "its weights and their EMA" if ema is not None else "its weights (no EMA saved)"
    cap = config.train.eval_max_batches
    images = f"{len(val_set)} images"
    if cap and cap * loader.batch_size < len(val_set):
        batches = f"{cap} batch{'es' if cap > 1 else ''}"
        images = (
            f"{cap * loader.batch_size} of its {images} (the first {batches}: "
            f"train.eval_max_batches={cap})"
        )
    log.info(f"evaluating {path}: {weights} on {images}, every inference rule")
    shown = ShowProgress(loader, enabled=info.is_main)
    try:
        metrics = evaluate_with_ema(
            student,
            ema,
            shown,
            rules_for(student),
            device,
            norm,
            amp_dtype(config.train, device),
            config,
        )
        return {**metrics, "classes": matched} if matched else metrics
    finally:
        distributed.shutdown()


def config_of_export(export: dict) -> dict:
    """The config (as a dict) an exported student's metadata implies: its model, classes,
    input size, normalisation and rule, evaluated on an image folder (``data.root`` to set)."""
    kwargs = {
        key: value
        for key, value in export["model_kwargs"].items()
        if key not in ("num_classes", "in_chans")
    }
    channels, size, _ = export["input_size"]
    return {
        "student": {"name": export["timm_name"], "kwargs": kwargs},
        "data": {
            "dataset": "folder",
            "num_classes": export["num_classes"],
            "in_chans": channels,
            "image_size": size,
            "mean": export["mean"],
            "std": export["std"],
            "eval_crop_pct": export["crop_pct"],
            "workers": min(8, os.cpu_count() or 1),  # this machine's, not the training one's
        },
        "augment": {"interpolation": export["interpolation"]},
        "distill": {"method": export["method"]},  # its rules; evaluation runs no teacher
        "teacher": {"mean": export["mean"], "std": export["std"]},
    }
