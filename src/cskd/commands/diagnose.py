"""``cskd diagnose``: the diagnostics of a finished (or running) run, from its directory.

Reads the run's ``config.yaml`` and checkpoint (``last.pt`` by default), rebuilds the student and
the teacher, and writes into ``RUN_DIR/diagnostics/``:

- ``diagnostics.json``: :func:`cskd.training.diagnostics.measure` on the first ``--images`` validation
  images at the end of training (teacher map quality, the student's agreement with the CKF
  target, attention distance per block), plus every per-epoch record ``train.diagnostics`` logged;
- ``maps.png``: for a few validation images, the image, the teacher's map, the student's patch
  predictions and the CKF target at early, middle and late progress;
- ``over_training.png``: the per-epoch records as curves (runs trained with
  ``train.diagnostics=true``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..config import load_config
from ..data import build_eval_set
from ..errors import ConfigError
from ..infra.weights import load_adapted
from ..method.adapters import DistilledStudent
from ..method.distiller import normalizer
from ..training import diagnostics
from ..training.models import build_student, build_teacher
from ..training.state import read_checkpoint
from .eval import RULES_FOR_SAVED

log = logging.getLogger("cskd")


def diagnose_run(
    run_dir: str | Path,
    *,
    checkpoint: str = "last.pt",
    images: int = 256,
    pictures: int = 6,
    overrides: list[str] | None = None,
) -> dict:
    """Write the run's diagnostics (see the module docstring); returns ``diagnostics.json``."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} holds no cskd run (no config.yaml): pass a run directory")
    saved = read_checkpoint(run_dir / checkpoint)
    config = load_config(config_path, [*RULES_FOR_SAVED, *(overrides or []), "train.device=cpu"])
    student = build_student(config)
    load_adapted(
        student, saved["student"], path=run_dir / checkpoint, what="student", adapt_head=False
    )
    student.eval()
    teacher = None
    if config.teacher.checkpoint or config.teacher.pretrained_tag:
        # the teacher's dense map whenever its model has one (whatever the run's method)
        teacher = build_teacher(config, method="deit")
    val_set = build_eval_set(config.data, config.augment)
    device = torch.device("cpu")
    probe = diagnostics.Probe(
        val_set,
        count=images,
        student_norm=normalizer(config.data.mean, config.data.std, device),
        schedule=config.distill.schedule,
    )
    epochs_done = saved["state"]["epoch"]
    progress = min(epochs_done, config.optim.epochs - 1) / config.optim.epochs
    result = {
        "run": str(run_dir),
        "checkpoint": checkpoint,
        "epochs_trained": epochs_done,
        "images": int(probe.targets.shape[0]),
        "final": probe.measure(student, teacher, progress=progress),
        "over_training": _logged(run_dir),
    }
    out = run_dir / "diagnostics"
    out.mkdir(exist_ok=True)
    (out / "diagnostics.json").write_text(json.dumps(result, indent=2))
    written = [out / "diagnostics.json"]
    if teacher is not None and not teacher.global_only and isinstance(student, DistilledStudent):
        count = min(pictures, probe.targets.shape[0])
        diagnostics.draw_maps(
            out / "maps.png",
            student=student,
            teacher=teacher,
            images=probe.images[:count],
            teacher_images=teacher.normalize(probe.device_pixels[:count]),
            pixels=probe.pixels[:count],
            targets=probe.targets[:count],
            schedule=config.distill.schedule,
            class_names=getattr(val_set, "classes", None),
        )
        written.append(out / "maps.png")
    if "cutmix" in result["final"]:
        diagnostics.plot_cutmix(
            out / "cutmix.png",
            result["final"]["cutmix"],
            title=f"{run_dir.name}: whose label each answer is under CutMix "
            f"({result['images'] - result['images'] % 2} validation images, paired)",
        )
        written.append(out / "cutmix.png")
    if result["over_training"]:
        title = f"{run_dir.name}: {config.distill.method}, schedule {config.distill.schedule}"
        diagnostics.plot_over_training(
            out / "over_training.png", result["over_training"], title=title
        )
        written.append(out / "over_training.png")
    result["files"] = [str(path) for path in written]
    return result


def _logged(run_dir: Path) -> list[dict]:
    """The epoch records of ``metrics.jsonl`` that hold diagnostics."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [
        {"epoch": r["epoch"], "diagnostics": r["diagnostics"]}
        for r in records
        if r.get("type") == "epoch" and "diagnostics" in r
    ]
