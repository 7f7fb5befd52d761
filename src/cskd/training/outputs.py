"""A finished run's outputs: ``student.safetensors`` (describing itself) and
``final_metrics.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import Config
from ..errors import NonFiniteError
from ..infra.checkpoint import save_safetensors_atomic
from ..infra.weights import export_metadata, non_finite
from .state import TrainState

log = logging.getLogger("cskd")


def write_final_outputs(
    run_dir: Path,
    config: Config,
    *,
    student,
    ema,
    state: TrainState,
    last: dict,
    test: dict | None,
    classes: list[str],
) -> None:
    """``student.safetensors`` (and the EMA's), each describing itself
    (:func:`export_description`), ``final_metrics.json`` and the summary line."""
    for weights in (student.state_dict(), ema.module.state_dict() if ema is not None else {}):
        if names := non_finite(weights):
            raise NonFiniteError(
                f"the trained weights are not finite ({', '.join(names[:3])}): nothing exported"
            )
    metadata = export_description(config, classes)
    save_safetensors_atomic(
        student.state_dict(), run_dir / "student.safetensors", metadata=metadata
    )
    if ema is not None:
        save_safetensors_atomic(
            ema.module.state_dict(), run_dir / "student_ema.safetensors", metadata=metadata
        )
    summary = final_summary(last, state.best, epochs=config.optim.epochs, test=test)
    (run_dir / "final_metrics.json").write_text(json.dumps(summary, indent=2))
    log.info(_final_line(summary, config.train.best_rule))


def export_description(config: Config, classes: list[str]) -> dict[str, str]:
    """What an exported student says about itself (:func:`cskd.infra.weights.export_metadata`):
    enough to rebuild it (:func:`cskd.training.models.load_student`) and feed it images."""
    size = config.data.image_size
    return export_metadata(
        timm_name=config.student.name,
        model_kwargs={
            **config.student.kwargs,
            "num_classes": config.data.num_classes,
            "in_chans": config.data.in_chans,
        },
        num_classes=config.data.num_classes,
        class_names=[str(name) for name in classes],
        input_size=[config.data.in_chans, size, size],
        mean=list(config.data.mean),
        std=list(config.data.std),
        interpolation=config.augment.interpolation,
        crop_pct=config.data.eval_crop_pct,
        inference_rule=config.student.inference_rule,
        method=config.distill.method,
    )


def final_summary(last: dict, best: dict, *, epochs: int, test: dict | None = None) -> dict:
    """What ``final_metrics.json`` holds: the last epoch's metrics (what this project reports)
    and each rule's best epoch (what the CSKD release reports), raw and EMA; with
    ``train.eval_test`` also the official test split's metrics at the last epoch. Epochs are
    counted from 1, as train.log counts them (``best`` counts from 0, as metrics.jsonl does)."""

    def from_one(entry: dict) -> dict:
        return {
            key: from_one(value) if isinstance(value, dict) else value + (key == "epoch")
            for key, value in entry.items()
        }

    summary = {
        "last_epoch": {"epoch": epochs, **last},
        "best_epoch": from_one(best),
        "note": (
            "last_epoch: every rule at the end of training (the weights in student.safetensors); "
            "best_epoch: per rule, the epoch with the highest validation top-1 (what the CSKD "
            "release reports; a choice made on the validation set). Epochs count from 1 here "
            "and in train.log; metrics.jsonl's records count from 0, as DeiT's log.txt"
        ),
    }
    if test is not None:
        summary["test_last_epoch"] = test
    return summary


def _final_line(summary: dict, rule: str) -> str:
    ema, name = rule.startswith("ema/"), rule.removeprefix("ema/")
    last = summary["last_epoch"].get("ema", {}) if ema else summary["last_epoch"]
    best = summary["best_epoch"].get("ema", {}) if ema else summary["best_epoch"]
    if name not in last or name not in best:
        return "finished"
    return (
        f"finished: {rule} top-1 {last[name]['top1']:.2f} at the last epoch "
        f"({summary['last_epoch']['epoch']}), best {best[name]['top1']:.2f} at epoch "
        f"{best[name]['epoch']} (the release reports the best epoch)"
    )
