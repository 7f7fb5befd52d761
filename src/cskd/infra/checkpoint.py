"""Reading and writing weights and checkpoints safely.

Reading never unpickles code: ``.safetensors`` files go through safetensors, everything else
through ``torch.load(weights_only=True)``, which refuses any pickled object other than tensors,
numbers, strings and containers of them. Writing is atomic: the object goes to a temporary file
in the same directory (``.<name>.<random>.tmp``), which is flushed, fsynced and renamed over the
target, and the directory is fsynced, so a crash, a kill or a full disk never leaves a
half-written file under the real name. Training checkpoints also carry a digest of their content
(:data:`DIGEST_KEY`), checked on every load, so a damaged copy is refused rather than resumed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save as safetensors_bytes

from ..errors import CheckpointError, ResourceError

DIGEST_KEY = "cskd_digest"  # CRC-32 of a saved dict's content, added by save_atomic


def read_file(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint or weights file without executing any pickled code.

    A file written by :func:`save_atomic` is checked against its digest, which is removed from
    the returned dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path")
    try:
        if path.suffix == ".safetensors":
            return load_safetensors(str(path), device="cpu")
        # timm's train.py and DeiT's main.py keep their argparse.Namespace in "args": rebuilding
        # one sets attributes and runs no code, so it is allowed, as timm's own loader does
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every failure becomes one clear message
        text = str(error)
        detail = _line_after(text, "WeightsUnpickler error:")
        if "Unsupported global" in detail or "Unsupported class" in detail:
            raise CheckpointError(
                f"refused to load {path}: it holds pickled Python objects, which could run code "
                f"when loaded ({detail}); cskd loads only tensors, numbers and strings: re-save "
                "the weights as a state dict or .safetensors, from a source you trust"
            ) from error
        reason = detail or (text.strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(
            f"cannot read checkpoint {path}: {reason.split('. ')[0]} - it is truncated, damaged "
            "or not a weights file (cskd reads .safetensors files and tensor-only torch "
            "checkpoints)"
        ) from error
    if isinstance(loaded, dict) and DIGEST_KEY in loaded:
        expected = loaded.pop(DIGEST_KEY)
        if content_digest(loaded) != expected:
            raise CheckpointError(
                f"checkpoint {path} is damaged: its content does not match the digest saved with "
                "it (a bad copy or disk); resume from another checkpoint (e.g. best.pt) instead"
            )
    return loaded


def _line_after(text: str, marker: str) -> str:
    """The first sentence after ``marker`` in ``text`` (torch's weights-only error names the
    refused global or opcode there), or ""."""
    if marker not in text:
        return ""
    rest = [line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()]
    return rest[0].split(". ")[0] if rest else ""


def content_digest(obj: Any) -> str:
    """CRC-32 (hex) of a nested dict/list/tuple: every tensor's dtype, shape and bytes, in order,
    and the ``repr`` of every key and other leaf (ints, floats, strings, None)."""
    crc = 0
    pending = [obj]
    while pending:
        value = pending.pop()
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous().reshape(-1)
            crc = zlib.crc32(f"{data.dtype}{tuple(value.shape)}".encode(), crc)
            crc = zlib.crc32(data.view(torch.uint8).numpy(), crc)
        elif isinstance(value, dict):
            crc = zlib.crc32(repr(list(value)).encode(), crc)
            pending.extend(reversed(list(value.values())))
        elif isinstance(value, list | tuple):
            crc = zlib.crc32(f"[{len(value)}]".encode(), crc)
            pending.extend(reversed(value))
        else:
            crc = zlib.crc32(repr(value).encode(), crc)
    return f"{crc:08x}"


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(file)`` atomically: a temporary file beside it, fsync,
    rename, fsync of the folder; a failure leaves the previous file (or none) in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600 would hide it from other users
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
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


def is_atomic_temporary(path: Path) -> bool:
    """Whether ``path`` is the temporary file of an :func:`atomic_write` (finished or not, it
    is never the file written: a kill between the write and the rename leaves it behind)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of writes a crash or kill interrupted; returns their paths."""
    stale = sorted(Path(directory).glob(".*.pt.*.tmp"))
    stale += sorted(Path(directory).glob(".*.safetensors.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _os_reason(error: BaseException) -> str | None:
    """The operating system's reason behind ``error`` (an OSError in its chain), if any."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    return cause.strerror or (os.strerror(cause.errno) if cause.errno else str(cause))


def _is_write_failure(error: BaseException) -> bool:
    """An OSError, or torch's stream writer failing (a RuntimeError) - not any RuntimeError: a
    DataLoader worker's death, say, can surface in the middle of a save."""
    if isinstance(error, OSError) or _os_reason(error) is not None:
        return True
    return any(mark in str(error) for mark in ("PytorchStreamWriter", "inline_container"))


def _write_failure(path: str | os.PathLike, error: BaseException) -> CheckpointError:
    """One line for a failed write, with the operating system's reason when there is one: torch's
    writer wraps the OSError of a full disk in a RuntimeError ("unexpected pos ...")."""
    reason = _os_reason(error) or (str(error).strip().splitlines() or [repr(error)])[0]
    return CheckpointError(
        f"could not write checkpoint {path}: {reason} (the previous checkpoint is intact; "
        "free disk space or fix the cause, then resume with train.resume=auto)"
    )


def output_failure(path: str | os.PathLike, error: BaseException) -> ResourceError:
    """One line for a run output (``config.yaml``, ``metrics.jsonl``) that could not be
    written: the operating system's reason, and that the last checkpoint is untouched."""
    reason = _os_reason(error) or (str(error).strip().splitlines() or [repr(error)])[0]
    return ResourceError(
        f"could not write {path}: {reason} (last.pt, if the run has one, is intact: free disk "
        "space or fix the cause, then rerun with train.resume=auto)"
    )


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically; :class:`~cskd.errors.ResourceError` in one line
    if the disk refuses it (the previous file stays)."""
    try:
        atomic_write(Path(path), lambda file: file.write(text.encode()))
    except OSError as error:
        raise output_failure(path, error) from error


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (temporary file, fsync, rename); a dict gets a
    :data:`DIGEST_KEY` entry that :func:`read_file` checks."""
    if isinstance(obj, dict):
        obj = {**obj, DIGEST_KEY: content_digest(obj)}
    try:
        atomic_write(Path(path), lambda file: torch.save(obj, file))
    except (OSError, RuntimeError) as error:
        if not _is_write_failure(error):
            raise
        raise _write_failure(path, error) from error


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file atomically; tensors are made contiguous and moved to the CPU.
    ``metadata`` (strings only) goes into the file's header."""
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    try:
        atomic_write(
            Path(path), lambda file: file.write(safetensors_bytes(tensors, metadata=metadata))
        )
    except (OSError, RuntimeError) as error:
        if not _is_write_failure(error):
            raise
        raise _write_failure(path, error) from error
