"""Validation and resolution: the bounds and choices read from the fields' metadata, then the
rules that span several keys (:func:`validate`); ``auto`` inference rules made the method's own
(:func:`resolve`, which returns a new config)."""

from __future__ import annotations

import dataclasses
import math
import re

from ..errors import ConfigError
from ..method.adapters import INFERENCE_RULES
from .schema import BOUNDS, Config, get_value


def validate(config: Config) -> Config:
    """Raise :class:`ConfigError` naming the first impossible value; return ``config`` as it
    is (``auto`` rules are checked as :func:`resolve` would turn them, but left unresolved)."""
    _check_fields(config)
    _check_warmup(config)
    for section in ("student", "teacher"):
        _check_kwargs(section, get_value(config, f"{section}.kwargs"))
    _check_eval_test(config)
    _check_rules(config)
    _check_normalisation(config)
    _check_initial_weights(config)
    _check_run_values(config)
    return config


MAX_SEED = 2**31 - 1  # numpy takes seeds below 2**32; seed + rank must stay below it
MAX_CLASSES = 1_000_000  # a head of more would be gigabytes before the first step
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def _check_run_values(config: Config) -> None:
    """Values that used to fail only once the run was built, with a traceback: the seed's
    range, the device's form, the class count."""
    if not 0 <= config.train.seed <= MAX_SEED:
        raise ConfigError(f"train.seed must lie in [0, {MAX_SEED}], got {config.train.seed}")
    if not DEVICE.fullmatch(config.train.device):
        raise ConfigError(
            f"train.device {config.train.device!r} is not a device: auto | cpu | cuda | cuda:N "
            "| mps"
        )
    if config.data.num_classes > MAX_CLASSES:
        raise ConfigError(
            f"data.num_classes {config.data.num_classes} is more than {MAX_CLASSES:,}: set it "
            "to the number of classes of the data"
        )


def _check_fields(config: Config) -> None:
    """The choices and bounds each field's metadata declares, section by section, in order."""
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        for item in dataclasses.fields(values):
            key, value = f"{section.name}.{item.name}", getattr(values, item.name)
            choices = item.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
            numbers = value if isinstance(value, list | tuple) else [value]
            if any(isinstance(n, float) and not math.isfinite(n) for n in numbers):
                raise ConfigError(f"{key} must be a finite number, got {value}")
            bound = item.metadata.get("bound")
            if bound:
                holds, rule = BOUNDS[bound]
                if not holds(value):
                    raise ConfigError(f"{key} {rule}, got {value}")


def _check_warmup(config: Config) -> None:
    if config.optim.warmup_epochs > config.optim.epochs:
        raise ConfigError("optim.warmup_epochs must not exceed optim.epochs")


def _check_eval_test(config: Config) -> None:
    if config.train.eval_test and config.data.val_split == 0:
        raise ConfigError(
            "train.eval_test=true needs data.val_split > 0 (a held-out validation split): "
            "without it the validation set already is the official test split"
        )


def _check_normalisation(config: Config) -> None:
    """The student's and (when there is one) the teacher's mean and std fit their channels."""
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


def resolve(config: Config) -> Config:
    """A new config with ``auto`` rules (``student.inference_rule``, ``train.best_rule``, also
    as ``ema/auto``) turned into the method's own rule, so that overriding only
    ``distill.method`` changes the rule with it. ``config`` itself is left unchanged."""
    own = METHOD_RULES.get(config.distill.method, "cls")
    rule = config.student.inference_rule
    best = config.train.best_rule
    return dataclasses.replace(
        config,
        student=dataclasses.replace(config.student, inference_rule=own if rule == "auto" else rule),
        train=dataclasses.replace(
            config.train,
            best_rule=best.replace("auto", own) if best.removeprefix("ema/") == "auto" else best,
        ),
    )


def _check_rules(config: Config) -> None:
    """Refuse a rule (as :func:`resolve` turns it) that uses a head the method never trains,
    and a ``train.best_rule`` that is no rule at all."""
    method = config.distill.method
    own = METHOD_RULES.get(method, "cls")
    trained = TRAINED_RULES.get(method, INFERENCE_RULES)
    resolved = resolve(config)
    best = resolved.train.best_rule
    for key, rule in (
        ("student.inference_rule", resolved.student.inference_rule),
        ("train.best_rule", best.removeprefix("ema/")),
    ):
        if rule in INFERENCE_RULES and rule not in trained:
            raise ConfigError(
                f"{key}={rule} uses a head that distill.method={method} does not train: use "
                f"{key}=auto (the method's rule, {own}) or one of {', '.join(trained)}"
            )
    if best.removeprefix("ema/") not in INFERENCE_RULES:
        raise ConfigError(
            f"train.best_rule: {best!r} is not a rule ({', '.join(INFERENCE_RULES)})"
            " optionally prefixed with ema/"
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
    """Refuse model keyword arguments that the library sets itself from other keys, and those
    timm would drop without a word: a key that is not a name (YAML's ``{img_size:32}``, with no
    space after the colon, is the key ``img_size:32``) or a null value."""
    for key, value in kwargs.items():
        if not str(key).isidentifier():
            raise ConfigError(
                f"{section}.kwargs key {key!r} is not a keyword name: write 'name: value' with a "
                "space after the colon (YAML reads 'img_size:32' as one key)"
            )
        if value is None:
            raise ConfigError(
                f"{section}.kwargs.{key} is null, and timm would ignore it: give it a value or "
                "remove it"
            )
        if (section, key) in RESERVED_KWARGS:
            raise ConfigError(
                f"{section}.kwargs.{key}: {RESERVED_KWARGS[section, key]}; remove it from "
                f"{section}.kwargs"
            )
