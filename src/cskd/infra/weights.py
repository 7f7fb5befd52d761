"""Putting saved weights into a model: the one place every path loads a state dict through.

Student initialisation, the teacher, resume and evaluation all read files with
:func:`cskd.infra.checkpoint.read_file` (never unpickling code) and find the state dict inside with
:func:`extract_state_dict`. Resume needs an exact fit (:func:`check_state_fits`). Initialising a
model for new data (:func:`init_from`) and evaluating at another image size
(:func:`load_adapted`) first adapt what may legitimately differ, with timm's own helpers:

- a classifier of another class count is re-initialised (the model's own initialisation is
  kept); with ``reset_head=True`` also one whose size fits (a new label set). A teacher's head
  must fit (``adapt_head=False``);
- another patch grid (224 -> 384 px): ``pos_embed`` is resampled by timm's
  ``resample_abs_pos_embed``, its class, distillation and register token entries kept;
- another patch size: ``patch_embed.proj.weight`` is resampled by timm's ``resample_patch_embed``;
- other input channels: the first convolution is adapted by timm's ``adapt_input_conv`` (3 -> 1
  sums the channels);
- anything else raises :class:`~cskd.errors.CheckpointError` naming the keys.

Each adaptation is returned as one sentence for the log.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import adapt_input_conv, clean_state_dict

from ..errors import CheckpointError
from .checkpoint import read_file

# entries holding a model's weights, in the order looked for: DeiT and the CSKD release ("model"),
# timm's train.py ("state_dict"), a cskd training checkpoint ("student")
MODEL_ENTRIES = ("model", "state_dict", "student")
# ... and its EMA: timm's train.py, DeiT's main.py, a cskd training checkpoint
EMA_ENTRIES = ("state_dict_ema", "model_ema", "ema")
# a cskd run directory's weights, in the order looked for (the final weights first)
RUN_FILES = ("student.safetensors", "best.pt", "last.pt")
RUN_EMA_FILES = ("student_ema.safetensors", "best.pt", "last.pt")


def resolve_source(path: str | os.PathLike, *, ema: bool = False) -> Path:
    """The weights file behind ``path``: the file itself, or for a cskd run directory its
    ``student.safetensors`` (``student_ema.safetensors`` with ``ema``), else ``best.pt``, else
    ``last.pt``. Raises :class:`CheckpointError` for a missing path or an empty directory."""
    path = Path(path)
    if path.is_dir():
        for name in RUN_EMA_FILES if ema else RUN_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(
            f"{path} is a directory without weights (expected a cskd run directory holding "
            f"{', '.join(RUN_FILES)}): point to the weights file itself"
        )
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path")
    return path


def extract_state_dict(
    obj: dict[str, Any], *, path: str | os.PathLike = "", ema: bool = False
) -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded file.

    Plain, ``{"model": ...}`` (DeiT, the CSKD release), ``{"state_dict": ...}`` (timm's
    train.py) or a cskd training checkpoint (its ``student``); with ``ema`` the EMA entry
    (``state_dict_ema``, ``model_ema`` or ``ema``). The ``module.`` (DDP) and ``_orig_mod.``
    (torch.compile) prefixes are removed by timm's ``clean_state_dict``. Raises
    :class:`CheckpointError` when no such entry exists.
    """
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a state dict: save the "
            "model's state_dict() (or a .safetensors file)"
        )
    for key in EMA_ENTRIES if ema else MODEL_ENTRIES:
        if isinstance(obj.get(key), dict):
            return clean_state_dict(obj[key])
    if ema:
        raise CheckpointError(
            f"checkpoint {path} holds no EMA weights (expected a 'state_dict_ema', 'model_ema' "
            "or 'ema' entry): drop the EMA request (checkpoint_ema=false)"
        )
    if obj and all(isinstance(value, torch.Tensor) for value in obj.values()):
        return clean_state_dict(obj)
    raise CheckpointError(
        f"checkpoint {path} holds no state dict (expected tensors, or a 'model', 'state_dict' "
        "or 'student' entry)"
    )


def read_state_dict(path: str | os.PathLike, *, ema: bool = False) -> tuple[dict, Path]:
    """``(state dict, the file it came from)`` for a weights file or a cskd run directory.
    :class:`CheckpointError` for a file whose floating-point tensors are not all finite."""
    source = resolve_source(path, ema=ema)
    in_entry = ema and source.name != RUN_EMA_FILES[0]  # student_ema.safetensors is the EMA
    state = extract_state_dict(read_file(source), path=source, ema=in_entry)
    check_finite(state, path=source)
    return state, source


def non_finite(state: dict[str, Any]) -> list[str]:
    """The names of the floating-point tensors in ``state`` holding NaN or an infinity. One
    device sync for the whole state (the names are found only when something is wrong)."""
    tensors = {
        name: value
        for name, value in state.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel()
    }
    if not tensors:
        return []
    flags = torch.stack([torch.isfinite(value).all() for value in tensors.values()])
    if bool(flags.all()):
        return []
    return [name for name, finite in zip(tensors, flags.tolist()) if not finite]


def check_finite(state: dict[str, Any], *, path: str | os.PathLike) -> None:
    """Refuse weights read from ``path`` that hold NaN or an infinity (a diverged run's), naming
    the tensors: no model is built, trained or evaluated from them."""
    if names := non_finite(state):
        raise CheckpointError(
            f"{path} holds weights that are not finite (NaN or inf in {_few(names)}): it is "
            "the output of a diverged run; use an earlier checkpoint or train it again"
        )


def timm_model(model: torch.nn.Module) -> torch.nn.Module:
    """The timm model inside a cskd wrapper (``DenseStudent``, ``DenseTeacher``...), or itself."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def classifier_weights(model: torch.nn.Module) -> list[tuple[str, int]]:
    """``(state-dict key of the weight, number of classes)`` of each timm classifier head
    (``head`` and ``head_dist`` of a distilled DeiT, ``fc`` of a ResNet, ``head.fc``...)."""
    inner = timm_model(model)
    if not hasattr(inner, "get_classifier"):
        return []
    heads = inner.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)
    names = {id(module): name for name, module in inner.named_modules()}
    return [
        (f"{names[id(head)]}.weight", head.out_features)
        for head in heads
        if isinstance(head, torch.nn.Linear) and id(head) in names
    ]


def check_state_fits(
    state: dict[str, Any],
    model: torch.nn.Module,
    *,
    path: str | os.PathLike,
    what: str,
    expected: dict[str, torch.Tensor] | None = None,
) -> None:
    """Raise :class:`CheckpointError` naming the keys and shapes where ``state`` and ``model``
    differ (or ``expected``, a part of its state dict); a classifier with another number of
    classes is named first, with both numbers."""
    expected = model.state_dict() if expected is None else expected
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
        for key in sorted(set(state) & set(expected))
        if state[key].shape != expected[key].shape
    ]
    if not (missing or unexpected or wrong_shape):
        return
    heads = classifier_weights(model)
    head_keys = {key.rsplit(".", 1)[0] for key, _ in heads}
    only_heads = not missing and not unexpected
    only_heads &= all(item.split(" ")[0].rsplit(".", 1)[0] in head_keys for item in wrong_shape)
    for key, classes in heads if only_heads else []:
        saved = state.get(key)
        if saved is not None and saved.ndim == 2 and saved.shape[0] != classes:
            raise CheckpointError(
                f"checkpoint {path} has a {saved.shape[0]}-class head but the {what} is built "
                f"for {classes} classes (data.num_classes={classes}): "
                f"{key} {tuple(saved.shape)} vs {tuple(expected[key].shape)}; use a checkpoint "
                f"trained on the data's {classes} classes"
            )
    parts = []
    if missing:
        parts.append(f"missing keys {_few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_few(unexpected)}")
    if wrong_shape:
        parts.append(f"shape mismatches {_few(wrong_shape)}")
    raise CheckpointError(
        f"checkpoint {path} does not fit the {what} ({type(timm_model(model)).__name__}): "
        + "; ".join(parts)
        + " - is it a checkpoint of another architecture or number of classes?"
    )


def adapt_state_dict(
    state: dict[str, torch.Tensor],
    model: torch.nn.Module,
    *,
    reset_head: bool = False,
    adapt_head: bool = True,
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """``(state adapted to model, one sentence per change, keys of re-initialised heads)``;
    see the module's docstring.

    The returned dict lacks the keys of re-initialised heads (the model keeps its own init for
    them, and only for them). Nothing is checked here beyond what is adapted:
    :func:`check_state_fits` names any other difference, a head the file lacks included.
    """
    inner = timm_model(model)
    expected = inner.state_dict()
    state = dict(state)
    changes: list[str] = []
    removed: list[str] = []

    heads = [key.rsplit(".", 1)[0] for key, _ in classifier_weights(inner)]
    saved_classes = {
        int(state[f"{head}.weight"].shape[0])
        for head in heads
        if f"{head}.weight" in state and state[f"{head}.weight"].ndim == 2
    }
    model_classes = int(expected[f"{heads[0]}.weight"].shape[0]) if heads else 0
    resized = any(
        f"{head}.weight" in state
        and state[f"{head}.weight"].shape != expected[f"{head}.weight"].shape
        for head in heads
    )
    if heads and (reset_head or (resized and adapt_head)):
        for head in heads:
            for key in (f"{head}.weight", f"{head}.bias"):
                if key in expected:
                    state.pop(key, None)
                    removed.append(key)
        reason = (
            f"the file has {'/'.join(map(str, sorted(saved_classes)))} classes, the model "
            f"{model_classes}"
            if resized
            else "reset_head: a new label set"
        )
        changes.append(f"re-initialised {', '.join(heads)} ({reason})")

    first_conv = _first_conv_key(inner)
    if first_conv in state and first_conv in expected:
        saved, wanted = state[first_conv], expected[first_conv]
        if (
            saved.ndim == 4
            and saved.shape[1] != wanted.shape[1]
            and saved.shape[0] == wanted.shape[0]
        ):
            state[first_conv] = adapt_input_conv(wanted.shape[1], saved.float()).to(saved.dtype)
            changes.append(
                f"adapted {first_conv} from {saved.shape[1]} to {wanted.shape[1]} input channels "
                "(timm adapt_input_conv)"
            )

    key = "patch_embed.proj.weight"
    if key in state and key in expected and state[key].ndim == 4:
        saved, wanted = state[key], expected[key]
        if saved.shape[:2] == wanted.shape[:2] and saved.shape[2:] != wanted.shape[2:]:
            state[key] = resample_patch_embed(saved, list(wanted.shape[2:]))
            changes.append(
                f"resampled {key} from patch {tuple(saved.shape[2:])} to {tuple(wanted.shape[2:])} "
                "(timm resample_patch_embed)"
            )

    if "pos_embed" in state and "pos_embed" in expected and hasattr(inner, "patch_embed"):
        saved, wanted = state["pos_embed"], expected["pos_embed"]
        prefix = 0 if getattr(inner, "no_embed_class", False) else inner.num_prefix_tokens
        cells = saved.shape[1] - prefix if saved.ndim == 3 else -1
        if (
            saved.ndim == 3
            and saved.shape[2] == wanted.shape[2]
            and saved.shape[1] != wanted.shape[1]
            and cells > 0
            and round(cells**0.5) ** 2 == cells  # else other tokens: check_state_fits names it
        ):
            new_grid = list(inner.patch_embed.grid_size)
            state["pos_embed"] = resample_abs_pos_embed(
                saved, new_size=new_grid, num_prefix_tokens=prefix
            )
            old = round((saved.shape[1] - prefix) ** 0.5)
            tokens = f"keeping its {prefix} token entries" if prefix else "tokens have no entries"
            changes.append(
                f"resampled pos_embed from a {old}x{old} to a {new_grid[0]}x{new_grid[1]} patch "
                f"grid, {tokens} (timm resample_abs_pos_embed)"
            )
    return state, changes, removed


def _first_conv_key(model: torch.nn.Module) -> str:
    """The state-dict key of the first convolution's weight (timm's ``first_conv``)."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    if isinstance(name, str) and name:
        return f"{name}.weight"
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            return f"{module_name}.weight"
    return ""


def init_from(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    what: str,
    ema: bool = False,
    reset_head: bool = False,
    adapt_head: bool = True,
) -> list[str]:
    """Initialise ``model`` from a weights file or cskd run directory; returns the log lines.

    Everything the file and the model share is copied exactly; heads, position embeddings,
    patch size and input channels are adapted as the module's table says; any other difference
    raises :class:`CheckpointError` naming the keys before the model is touched.
    ``adapt_head=False`` (a teacher) keeps a head of another size an error.
    """
    state, source = read_state_dict(path, ema=ema)
    changes = load_adapted(
        model, state, path=source, what=what, reset_head=reset_head, adapt_head=adapt_head
    )
    return [f"{what}: initialised from {source}" + (" (EMA weights)" if ema else "")] + changes


def load_adapted(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    *,
    path: str | os.PathLike,
    what: str,
    reset_head: bool = False,
    adapt_head: bool = True,
) -> list[str]:
    """Load ``state`` into ``model`` after :func:`adapt_state_dict`; re-initialised heads keep
    the model's own values. A wrapper's own weights beside the timm model's (a MapStudent's
    distillation head: its ``OWN_KEYS``) load as saved. Returns one log line per adaptation;
    raises :class:`CheckpointError` (before touching the model) for any other difference."""
    inner = timm_model(model)
    prefixes = getattr(model, "OWN_KEYS", ())
    wrapper = {key: value for key, value in state.items() if key.startswith(prefixes)}
    state = {key: value for key, value in state.items() if key not in wrapper}
    expected = {k: v for k, v in model.state_dict().items() if prefixes and k.startswith(prefixes)}
    check_state_fits(wrapper, model, path=path, what=what, expected=expected)
    state, changes, removed = adapt_state_dict(
        state, inner, reset_head=reset_head, adapt_head=adapt_head
    )
    own = inner.state_dict()
    kept = {key: own[key] for key in removed}
    check_state_fits({**state, **kept}, inner, path=path, what=what)
    inner.load_state_dict({**state, **kept})
    if wrapper:
        model.load_state_dict({**model.state_dict(), **wrapper})
    return [f"{what}: {change}" for change in changes]


# ------------------------------------------------------------------ exported students

EXPORT_FORMAT = "cskd-student/1"
EXPORT_KEYS = ("timm_name", "model_kwargs", "num_classes", "class_names", "input_size", "mean")
EXPORT_KEYS += ("std", "interpolation", "crop_pct", "inference_rule", "method")


def export_metadata(**values: Any) -> dict[str, str]:
    """The header of an exported ``student.safetensors``: ``format`` plus each of
    :data:`EXPORT_KEYS` as JSON text (safetensors metadata holds strings only). ``model_kwargs``
    are the ``timm.create_model`` keyword arguments that rebuild the architecture
    (``num_classes`` and ``in_chans`` included); ``input_size`` is ``[C, H, W]``."""
    missing = [key for key in EXPORT_KEYS if key not in values]
    if missing:
        raise ValueError(f"export metadata lacks {', '.join(missing)}")
    return {"format": EXPORT_FORMAT, **{key: json.dumps(values[key]) for key in EXPORT_KEYS}}


def read_export_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The parsed header of an exported student (``None`` for a file without one: other
    ``.safetensors`` files, or cskd's before the format existed)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            header = file.metadata() or {}
    except Exception as error:  # noqa: BLE001 - a damaged header is one clear line
        raise CheckpointError(f"cannot read {path}: {error} - is it a .safetensors file?") from None
    if header.get("format") != EXPORT_FORMAT:
        return None
    try:
        return {key: json.loads(header[key]) for key in EXPORT_KEYS}
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: damaged cskd metadata ({error})") from None


def _few(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")
