"""The typed configuration schema shared by YAML recipes, command-line overrides and the API.

A recipe is a YAML file whose keys mirror :class:`Config`. ``base: other.yaml`` (relative to the
file) makes a recipe a small override of another. Command-line overrides are ``key.path=value``
with YAML-typed values. Unknown keys, wrong types and impossible values raise
:class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .losses import LOSS_KINDS, METHODS
from .models import INFERENCE_RULES
from .schedules import PROGRESS_UNITS, SCHEDULES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key."""


@dataclass
class StudentConfig:
    name: str = "deit_tiny_distilled_patch16_224"  # a timm ViT
    kwargs: dict = field(default_factory=dict)  # passed to timm.create_model (img_size, depth...)
    drop_path: float = 0.1  # stochastic depth rate (timm drop_path_rate)
    inference_rule: str = "auto"  # auto (the method's own) | cls | cls+dist | cls+dist+patch
    # initial weights: a local file (.safetensors, state dict, DeiT/timm/cskd checkpoint) or a
    # cskd run directory; heads of another class count are re-initialised, position embeddings
    # resampled to the patch grid, input channels adapted (docs/design.md "Initial weights")
    checkpoint: str = ""
    pretrained_tag: str = ""  # or a timm tag (e.g. fb_in1k) fetched from timm's hub
    checkpoint_ema: bool = False  # take the file's EMA weights (state_dict_ema, model_ema, ema)
    reset_head: bool = False  # re-initialise the heads even when their class count fits
    trainable: str = "all"  # all | head: only the classifier heads train (a linear probe)


@dataclass
class TeacherConfig:
    name: str = "regnety_160"  # a timm CNN with a global-average-pool + linear head
    checkpoint: str = ""  # local .safetensors / state dict / {"model": ...}
    pretrained_tag: str = ""  # or a timm tag (e.g. deit_in1k) fetched from timm's hub
    kwargs: dict = field(default_factory=dict)  # passed to timm.create_model (e.g. output_stride)
    mean: tuple[float, ...] = IMAGENET_MEAN  # the teacher's own input normalisation
    std: tuple[float, ...] = IMAGENET_STD  # the teacher's own input normalisation
    # the teacher's precision: auto (fp16 on GPU, as released; fp32 on CPU) | fp32 | fp16 | bf16
    # (docs/results/teacher_precision.md: bf16 flips ~10x more hard targets than fp16)
    amp: str = "auto"
    # the teacher's responses read from a cache (`cskd cache` builds it; docs/results/cache.md
    # says what it follows exactly): "" = the teacher runs in every training step
    cache: str = ""
    # `cskd cache`: the whole image's size for the teacher (0 = data.image_size: a teacher
    # answers best at its training size; at twice it, docs/results/cache.md's agreement fell 3x)
    cache_size: int = 0
    cache_topk: int = 0  # `cskd cache`: keep the k largest logits per cell (0 = every class)
    cache_dtype: str = "float16"  # `cskd cache`: float16 | float32 storage of the logits
    cache_shard_size: int = 1024  # `cskd cache`: images per shard file
    memory_format: str = "auto"  # auto (channels_last on a GPU) | channels_last | contiguous


@dataclass
class DataConfig:
    # folder (ImageNet layout) | fashion_mnist | translated_fashion_mnist | synthetic
    dataset: str = "folder"
    root: str = ""  # folder: contains train/ and val/; fashion_mnist: "" = the Debian package
    download: bool = False  # fashion_mnist only: torchvision's downloader when files are missing
    num_classes: int = 1000  # classes of the data (student and teacher heads)
    image_size: int = 224  # training and evaluation size in pixels (square)
    in_chans: int = 3  # image channels (1 for Fashion-MNIST)
    mean: tuple[float, ...] = IMAGENET_MEAN  # the student's input normalisation
    std: tuple[float, ...] = IMAGENET_STD  # the student's input normalisation
    batch_size: int = 128  # per process
    eval_batch_size: int = 0  # 0 = 2 x batch_size
    workers: int = 8  # data loader worker processes per process (they persist across epochs)
    prefetch_factor: int = 2  # batches each loader worker keeps ready
    train_subset: int = 0  # 0 = every training image; N = a fixed random subset of N
    subset_seed: int = 0  # seed of the train_subset / val_split choice
    val_split: int = 0  # N > 0: hold out N training images as validation (test set untouched)
    synthetic_size: int = 64  # synthetic: training images (validation: a quarter)
    canvas_size: int = 64  # translated_fashion_mnist: the canvas the 28 px garment is placed on
    clutter: int = 0  # translated_fashion_mnist: fragments of other garments on each canvas
    skip_corrupt: bool = False  # skip unreadable images instead of stopping
    eval_crop_pct: float = 0.875  # evaluation: resize to image_size / eval_crop_pct, centre crop


@dataclass
class AugmentConfig:
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    hflip: float = 0.5  # horizontal flip probability
    randaugment: str = "rand-m9-mstd0.5-inc1"  # "" = off
    color_jitter: float = 0.3  # used only when randaugment is off (as timm)
    interpolation: str = "bicubic"  # resize interpolation for training and evaluation
    reprob: float = 0.25  # random erasing probability
    mixup: float = 0.8  # Mixup alpha (0 = off)
    cutmix: float = 1.0  # CutMix alpha (0 = off)
    mixup_switch_prob: float = 0.5  # chance of CutMix instead of Mixup when both are on
    label_smoothing: float = 0.1  # label smoothing of the base loss
    repeated_aug: bool = True  # repeated augmentation (3 copies per image, DeiT)


@dataclass
class DistillConfig:
    method: str = "cskd"  # none | deit | cskd
    alpha: float = 0.5  # token-loss weight; base loss gets 1 - alpha
    token_kind: str = "hard"  # DeiT token loss: hard | soft
    cskd_kind: str = "hard"  # CSKD loss: hard | soft
    cskd_weight: float = 1.0  # weight of the CSKD loss (1.0 as released)
    schedule: str = "linear"  # linear | x2 | cos | dense | global
    progress: str = "epoch"  # epoch (as released) | step
    tau: float = 1.0  # temperature of the soft losses


@dataclass
class OptimConfig:
    name: str = "adamw"  # any timm optimizer name
    lr: float = 5e-4  # at lr_batch_reference images; scaled linearly with the global batch
    lr_batch_reference: int = 512  # the batch optim.lr is given for
    weight_decay: float = 0.05  # AdamW weight decay (not on norms, biases, tokens)
    clip_grad: float = 0.0  # 0 = off
    epochs: int = 300  # training epochs
    warmup_epochs: int = 5  # linear warm-up epochs from warmup_lr
    warmup_lr: float = 1e-6  # not scaled with the batch (as DeiT); must stay below the peak
    min_lr: float = 1e-5  # not scaled with the batch (as DeiT); must stay below the peak
    schedule_unit: str = "step"  # step: lr updated every step | epoch: once per epoch (DeiT)


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"  # the run directory
    seed: int = 0  # initialisation, data order and augmentation seed
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on GPU, off on CPU) | off | bf16 | fp16
    ema: bool = True  # keep an EMA of the student's weights (timm ModelEmaV3)
    ema_decay: float = 0.99996  # EMA decay per step
    log_interval: int = 50  # steps between log lines and metrics records
    resume: str = ""  # "" | auto | path to a checkpoint
    overwrite: bool = False  # allow an output_dir that holds another run
    best_rule: str = "auto"  # auto (the method's own rule) | a rule | "ema/<rule>"
    checkpoint_interval: int = 0  # also save last.pt every N steps (0 = at epoch ends only)
    stop_after_steps: int = 0  # save last.pt and stop after N global steps (0 = run to the end)
    max_steps_per_epoch: int = 0  # 0 = the whole epoch; N = stop each epoch after N steps
    eval_max_batches: int = 0  # 0 = the whole validation set
    eval_test: bool = False  # with data.val_split > 0: also evaluate the official test split
    eval_interval: int = 1  # evaluate after every N-th epoch (and always after the last)
    diagnostics: bool = False  # log teacher-map, student-agreement and attention diagnostics
    diagnostics_images: int = 256  # validation images the diagnostics are measured on
    channels_last: bool = False  # channels-last memory format for the student
    compile: bool = False  # torch.compile the student and the teacher
    compile_backend: str = "inductor"  # torch.compile backend (e.g. eager, to test tracing)
    dist_backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    dist_timeout_s: int = 1800  # torchrun collective timeout in seconds


@dataclass
class Config:
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


CHOICES = {
    "student.inference_rule": ("auto", *INFERENCE_RULES),
    "student.trainable": ("all", "head"),
    "data.dataset": ("folder", "fashion_mnist", "translated_fashion_mnist", "synthetic"),
    "augment.interpolation": ("bicubic", "bilinear", "nearest"),
    "distill.method": METHODS,
    "distill.token_kind": LOSS_KINDS,
    "distill.cskd_kind": LOSS_KINDS,
    "distill.schedule": SCHEDULES,
    "distill.progress": PROGRESS_UNITS,
    "train.amp": ("auto", "off", "bf16", "fp16"),
    "teacher.amp": ("auto", "fp32", "fp16", "bf16"),
    "teacher.cache_dtype": ("float16", "float32"),
    "teacher.memory_format": ("auto", "channels_last", "contiguous"),
    "optim.schedule_unit": ("step", "epoch"),
    "train.dist_backend": ("auto", "nccl", "gloo"),
}
POSITIVE = ("data.num_classes", "data.image_size", "data.in_chans", "data.batch_size")
POSITIVE += ("optim.lr", "optim.epochs", "optim.lr_batch_reference", "train.log_interval")
POSITIVE += ("distill.tau", "train.dist_timeout_s", "train.eval_interval")
POSITIVE += ("train.diagnostics_images", "teacher.cache_shard_size", "data.prefetch_factor")
NON_NEGATIVE = ("data.workers", "data.train_subset", "data.val_split", "optim.weight_decay")
NON_NEGATIVE += ("optim.warmup_epochs", "optim.clip_grad", "optim.min_lr", "optim.warmup_lr")
NON_NEGATIVE += (
    "train.checkpoint_interval",
    "train.max_steps_per_epoch",
    "train.eval_max_batches",
    "distill.cskd_weight",
)
NON_NEGATIVE += ("data.eval_batch_size", "student.drop_path")
NON_NEGATIVE += ("teacher.cache_size", "teacher.cache_topk")
PROBABILITIES = ("augment.hflip", "augment.reprob", "augment.mixup_switch_prob")
PROBABILITIES += ("distill.alpha", "train.ema_decay", "augment.label_smoothing")
# PyYAML (YAML 1.1) reads "1e-3" and "5e-4" as strings; float fields accept such numbers.
SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _convert(value: Any, kind: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``kind``; ints widen to floats, lists to tuples."""
    origin = typing.get_origin(kind)
    if kind is float and isinstance(value, str) and SCIENTIFIC.fullmatch(value.strip()):
        return float(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (str, int, float, bool):
        if type(value) is not kind:
            raise ConfigError(
                f"{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}"
            )
        return value
    if kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = typing.get_args(kind)[0]
        fixed = typing.get_args(kind)[-1] is not Ellipsis
        if fixed and len(value) != len(typing.get_args(kind)):
            raise ConfigError(f"{key}: expected {len(typing.get_args(kind))} values, got {value!r}")
        return tuple(_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"unsupported annotation {kind!r} for {key}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}: valid keys in "
            f"{prefix.rstrip('.') or 'the config'} are {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in values.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _convert(value, kind, f"{prefix}{name}")
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    """``update`` over ``base``, mappings merged key by key at every depth (a one-key override
    such as ``student.kwargs.img_size=48`` keeps the other kwargs). One named exception: when
    the same update also names another model (``name``), its ``kwargs`` replace the old ones,
    since keyword arguments belong to the model they were written for (``cskd.yaml`` turns the
    teacher recipe's CNN student into a ViT)."""
    merged = dict(base)
    for key, value in update.items():
        new_model = key == "kwargs" and update.get("name", base.get("name")) != base.get("name")
        if value is _CLEAR:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict) and not new_model:
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_recipe(path: str | Path) -> dict:
    """The raw mapping of a recipe, with ``base:`` files merged underneath it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    base = values.pop("base", None)
    if base:
        return _merge(read_recipe(path.parent / base), values)
    return values


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``key.path=value`` overrides in order. ``student.kwargs.depth=3`` sets one keyword
    argument and keeps the others; ``student.kwargs={...}`` (a whole mapping for a ``kwargs``
    key) replaces them all, as written."""
    for text in overrides:
        keys, value = parse_override(text)
        update: dict = {keys[-1]: value}
        for key in reversed(keys[:-1]):
            update = {key: update}
        if keys[-1] == "kwargs" and isinstance(value, dict):
            values = _merge(values, _without(update, keys))  # drop the old mapping first
        values = _merge(values, update)
    return values


def _without(update: dict, keys: list[str]) -> dict:
    """``update`` with the mapping at ``keys`` emptied (so that merging it clears that key)."""
    cleared: dict = {keys[-1]: _CLEAR}
    for key in reversed(keys[:-1]):
        cleared = {key: cleared}
    return cleared


_CLEAR = object()  # merged in place of a mapping, removes it


def validate(config: Config) -> Config:
    """Raise :class:`ConfigError` naming the first impossible value."""
    for key, choices in CHOICES.items():
        value = get_value(config, key)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    for key in POSITIVE:
        if get_value(config, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {get_value(config, key)}")
    for key in NON_NEGATIVE:
        if get_value(config, key) < 0:
            raise ConfigError(f"{key} must not be negative, got {get_value(config, key)}")
    for key in PROBABILITIES:
        if not 0.0 <= get_value(config, key) <= 1.0:
            raise ConfigError(f"{key} must lie in [0, 1], got {get_value(config, key)}")
    if config.optim.warmup_epochs > config.optim.epochs:
        raise ConfigError("optim.warmup_epochs must not exceed optim.epochs")
    for section in ("student", "teacher"):
        _check_kwargs(section, get_value(config, f"{section}.kwargs"))
    if config.train.eval_test and config.data.val_split == 0:
        raise ConfigError(
            "train.eval_test=true needs data.val_split > 0 (a held-out validation split): "
            "without it the validation set already is the official test split"
        )
    _resolve_rules(config)
    rule = config.train.best_rule.removeprefix("ema/")
    if rule not in INFERENCE_RULES:
        raise ConfigError(
            f"train.best_rule: {config.train.best_rule!r} is not a rule ({', '.join(INFERENCE_RULES)})"
            " optionally prefixed with ema/"
        )
    if (
        len(config.data.mean) != config.data.in_chans
        or len(config.data.std) != config.data.in_chans
    ):
        raise ConfigError(
            f"data.mean and data.std need {config.data.in_chans} values (data.in_chans)"
        )
    channels = config.teacher.kwargs.get("in_chans", config.data.in_chans)
    if config.distill.method != "none" and (
        len(config.teacher.mean) != channels or len(config.teacher.std) != channels
    ):
        raise ConfigError(
            f"teacher.mean and teacher.std need {channels} values (the teacher's input channels), "
            f"got {len(config.teacher.mean)} and {len(config.teacher.std)}"
        )
    _check_initial_weights(config)
    return config


def _check_initial_weights(config: Config) -> None:
    for section in ("student", "teacher"):
        if get_value(config, f"{section}.checkpoint") and get_value(
            config, f"{section}.pretrained_tag"
        ):
            raise ConfigError(
                f"{section}.checkpoint and {section}.pretrained_tag are both set: keep one"
            )
    student = config.student
    if not (student.checkpoint or student.pretrained_tag):
        if student.trainable == "head":
            raise ConfigError(
                "student.trainable=head (a linear probe) needs pretrained features: set "
                "student.checkpoint (or student.pretrained_tag)"
            )
        for key in ("checkpoint_ema", "reset_head"):
            if getattr(student, key):
                raise ConfigError(
                    f"student.{key}=true needs initial weights: set student.checkpoint (or "
                    "student.pretrained_tag)"
                )
    if student.checkpoint_ema and student.pretrained_tag:
        raise ConfigError("student.checkpoint_ema applies to student.checkpoint, not to a tag")


# The inference rule of each method (``auto``), and the rules whose heads the method trains.
METHOD_RULES = {"none": "cls", "deit": "cls+dist", "cskd": "cls+dist+patch"}
TRAINED_RULES = {
    "none": ("cls",),
    "deit": ("cls", "cls+dist"),
    "cskd": ("cls", "cls+dist", "cls+dist+patch"),
}


def _resolve_rules(config: Config) -> None:
    """Turn ``auto`` into the method's own rule (so that overriding only ``distill.method``
    changes the rule with it) and refuse a rule that uses a head the method never trains."""
    method = config.distill.method
    own = METHOD_RULES.get(method, "cls")
    if config.student.inference_rule == "auto":
        config.student.inference_rule = own
    best = config.train.best_rule
    if best.removeprefix("ema/") == "auto":
        config.train.best_rule = best.replace("auto", own)
    trained = TRAINED_RULES.get(method, INFERENCE_RULES)
    for key, rule in (
        ("student.inference_rule", config.student.inference_rule),
        ("train.best_rule", config.train.best_rule.removeprefix("ema/")),
    ):
        if rule in INFERENCE_RULES and rule not in trained:
            raise ConfigError(
                f"{key}={rule} uses a head that distill.method={method} does not train: use "
                f"{key}=auto (the method's rule, {own}) or one of {', '.join(trained)}"
            )


RESERVED_KWARGS = {  # (section, key) -> where the value comes from instead
    ("student", "num_classes"): "the class count comes from data.num_classes",
    ("teacher", "num_classes"): "the class count comes from data.num_classes (a teacher of "
    "other classes must be refit first)",
    ("student", "in_chans"): "the input channels come from data.in_chans",
    ("student", "pretrained"): "weights are not loaded through kwargs (students start from "
    "random weights)",
    ("teacher", "pretrained"): "set teacher.pretrained_tag (a timm tag) or teacher.checkpoint",
    ("student", "drop_path_rate"): "set student.drop_path",
}


def _check_kwargs(section: str, kwargs: dict) -> None:
    """Refuse model keyword arguments that the library sets itself from other keys."""
    for key in kwargs:
        if (section, key) in RESERVED_KWARGS:
            raise ConfigError(
                f"{section}.kwargs.{key}: {RESERVED_KWARGS[section, key]}; remove it from "
                f"{section}.kwargs"
            )


def get_value(config: Config, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def from_dict(values: dict) -> Config:
    return validate(_build(Config, values, ""))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Resolve a recipe (or the defaults) plus ``key.path=value`` overrides into a Config."""
    values = read_recipe(path) if path else {}
    return from_dict(apply_overrides(values, overrides or []))


def to_dict(config: Config) -> dict:
    """Plain YAML-safe mapping (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def describe() -> str:
    """Every section and key with its default and its meaning, read from this module's own
    schema (the comment on or above each field), for ``cskd train --help``."""
    import inspect

    lines = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        notes: dict[str, str] = {}
        pending: list[str] = []
        for line in inspect.getsource(cls).splitlines()[1:]:
            text = line.strip()
            if text.startswith("#"):
                pending.append(text.lstrip("# "))
                continue
            found = re.match(r"(\w+): [^=]+=.*?(?:#\s*(.*))?$", text)
            if found:
                notes[found.group(1)] = found.group(2) or " ".join(pending)
            pending = []
        lines.append(f"{section.name}:")
        defaults = cls()
        for item in dataclasses.fields(cls):
            default = getattr(defaults, item.name)
            shown = json.dumps(list(default) if isinstance(default, tuple) else default)
            note = notes.get(item.name, "")
            lines.append(
                f"  {section.name}.{item.name} = {shown}" + (f"  # {note}" if note else "")
            )
    return "\n".join(lines)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
