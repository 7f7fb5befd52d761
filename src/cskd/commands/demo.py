"""The Fashion-MNIST demo: a CNN teacher, then the same small ViT with CSKD and without a teacher.

Everything runs through the recipes in ``configs/fashion_mnist`` and the ordinary ``train`` entry
point; the demo only chains them and prints the accuracy table at the end.
"""

from __future__ import annotations

import logging
import time
from importlib import resources
from pathlib import Path

from ..config import load_config
from ..method.adapters import INFERENCE_RULES
from ..training.run import train

log = logging.getLogger("cskd")
QUICK = ["train.max_steps_per_epoch=2", "train.eval_max_batches=1", "optim.epochs=1"]
QUICK += ["optim.warmup_epochs=0"]


def recipe_dir() -> Path:
    """``configs/fashion_mnist`` of the source tree (the demo runs from a checkout)."""
    here = Path(__file__).resolve().parents[3] / "configs" / "fashion_mnist"
    if here.is_dir():
        return here
    return Path(str(resources.files("cskd"))) / "configs" / "fashion_mnist"


def run_demo(*, output_dir: str | Path = "runs/demo", quick: bool = False) -> dict:
    """Train the teacher, the CSKD student and the no-teacher student; print and return a table."""
    output_dir = Path(output_dir)
    recipes = recipe_dir()
    extra = QUICK if quick else []
    started = time.perf_counter()
    teacher_dir = output_dir / "teacher"
    results = {}
    runs = [
        ("teacher (CNN, supervised)", "teacher.yaml", teacher_dir),
        ("ViT student, CSKD", "cskd.yaml", output_dir / "cskd"),
        ("ViT student, no teacher", "none.yaml", output_dir / "none"),
    ]
    for title, recipe, run_dir in runs:
        config = load_config(
            recipes / recipe,
            [
                f"train.output_dir={run_dir}",
                f"teacher.checkpoint={teacher_dir / 'student.safetensors'}",
                "train.overwrite=true",
                *extra,
            ],
        )
        log.info(f"demo: {title} ({recipe})")
        results[title] = train(config)
    table = format_table(results)
    minutes = (time.perf_counter() - started) / 60
    print(f"\nFashion-MNIST test top-1 (%), {minutes:.1f} min on this machine\n\n{table}")
    (output_dir / "results.md").write_text(table + "\n")
    return results


def format_table(results: dict) -> str:
    """A Markdown table: one row per run, one column per inference rule (- where not defined)."""
    header = "| run | " + " | ".join(INFERENCE_RULES) + " |"
    lines = [header, "|---" * (len(INFERENCE_RULES) + 1) + "|"]
    for title, metrics in results.items():
        cells = [
            f"{metrics[rule]['top1']:.2f}" if rule in metrics else "-" for rule in INFERENCE_RULES
        ]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
