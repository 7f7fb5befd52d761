"""What a run writes as it goes: ``train.log``, ``metrics.jsonl`` and TensorBoard events.

Only the main rank writes; the other ranks get a logger that drops records (a rank filter).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from .checkpoint import output_failure
from .distributed import RankFilter

log = logging.getLogger("cskd")


def setup_logging(*, rank: int, log_file: Path | None = None) -> None:
    """Console (stderr) and file handlers on the ``cskd`` logger, filtered to rank 0."""
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None and rank == 0:
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(RankFilter(rank))
        log.addHandler(handler)


class MetricsWriter:
    """Appends one JSON object per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, *, enabled: bool, resume_step: int = 0) -> None:
        """``resume_step``: the checkpoint's step; TensorBoard events logged after it by a killed
        run are purged, as ``metrics.jsonl`` records are."""
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(
                log_dir=str(run_dir / "tensorboard"),
                purge_step=resume_step + 1 if resume_step else None,
            )

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with self.path.open("a") as file:
                file.write(json.dumps(record) + "\n")
                file.flush()
        except OSError as error:
            raise output_failure(self.path, error) from error
        step = record.get("step", 0)
        prefix = "train" if record.get("type") == "step" else "epoch"
        for key, value in _flatten(record).items():
            if isinstance(value, int | float) and key not in ("step", "epoch"):
                self.tensorboard.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _flatten(record: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def truncate_after(path: Path, global_step: int, *, completed_epochs: int | None = None) -> None:
    """Drop records logged after ``global_step`` (a resumed run logs them again), and epoch
    records of epochs from ``completed_epochs`` on: a checkpoint saved at an epoch's last step
    precedes that epoch's evaluation, which the resumed run repeats."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
        if record.get("step", 0) > global_step:
            continue
        if record.get("type") == "epoch" and completed_epochs is not None:
            if record.get("epoch", 0) >= completed_epochs:
                continue
        kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
