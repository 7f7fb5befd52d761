"""Reading and writing weights and checkpoints safely.

Reading never unpickles code: ``.safetensors`` files go through safetensors, everything else
through ``torch.load(weights_only=True)``. Writing is atomic: the object goes to a temporary file
in the same directory, which is flushed, fsynced and renamed over the target, so a crash or a full
disk never leaves a half-written file under the real name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors


class CheckpointError(RuntimeError):
    """A weights or checkpoint file is missing, unreadable, unsafe or does not fit the model."""


def read_file(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint or weights file without executing any pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path")
    try:
        if path.suffix == ".safetensors":
            return load_safetensors(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every failure becomes one clear message
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: {reason} (only safetensors files and tensor-only "
            "torch checkpoints are loaded; re-save it as a state dict or .safetensors)"
        ) from error


def extract_state_dict(obj: dict[str, Any], *, path: str | os.PathLike = "") -> dict[str, Any]:
    """The model state dict inside a loaded file: plain, ``{"model": ...}`` or ``{"state_dict": ...}``."""
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            return obj[key]
    if obj and all(isinstance(value, torch.Tensor) for value in obj.values()):
        return obj
    raise CheckpointError(
        f"checkpoint {path} holds no state dict (expected tensors, or a 'model' entry)"
    )


def load_weights(model: torch.nn.Module, path: str | os.PathLike, *, what: str = "model") -> None:
    """Load a weights file into ``model`` strictly; mismatching keys and shapes are named."""
    state = extract_state_dict(read_file(path), path=path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
        for key in sorted(set(state) & set(expected))
        if state[key].shape != expected[key].shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if wrong_shape:
            parts.append(f"shape mismatches {_few(wrong_shape)}")
        raise CheckpointError(
            f"checkpoint {path} does not fit the {what} ({type(model).__name__}): "
            + "; ".join(parts)
            + " - is it a checkpoint of another architecture or number of classes?"
        )
    model.load_state_dict(state)


def _few(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (temporary file, fsync, rename)."""
    try:
        _atomic_write(Path(path), lambda temporary: torch.save(obj, temporary))
    except OSError as error:
        raise CheckpointError(
            f"could not write checkpoint {path}: {error.strerror or error} "
            "(the previous checkpoint is intact; free disk space and resume)"
        ) from error


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a safetensors file atomically; tensors are made contiguous and moved to the CPU."""
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    try:
        _atomic_write(Path(path), lambda temporary: save_safetensors(tensors, temporary))
    except OSError as error:
        raise CheckpointError(f"could not write {path}: {error.strerror or error}") from error
