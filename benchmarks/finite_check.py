"""What the non-finite checks cost next to the training step they guard (issue 29).

Two checks were added to a run: the student's (and its EMA's) weights, at each log interval and
before every save (``Trainer.weights_finite``: one ``isfinite`` pass over every tensor), and the
teacher's outputs, at every step (``engine.teacher_non_finite``, folded into the loss's one
sync). This measures each beside a full training step (teacher forward, student forward and
backward, AdamW update) of the ImageNet recipes' models at 224 px, one thread, medians over
repeats measured side by side, and writes ``docs/results/finite_check.{json,md}``.

    python benchmarks/finite_check.py            # about 3 minutes on one CPU core
    python benchmarks/finite_check.py --quick    # tiny models: a smoke test (CI)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

from cskd.infra.weights import non_finite
from cskd.method.adapters import TeacherOutput
from cskd.training.engine import teacher_non_finite

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model  # noqa: E402

STUDENTS = ("deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224")
TEACHER = "regnety_160"


def median_seconds(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(student_name: str, *, quick: bool, batch: int, repeats: int) -> dict:
    kwargs = {"img_size": 32, "depth": 1, "embed_dim": 32, "num_heads": 2} if quick else {}
    size = 32 if quick else 224
    student = timm.create_model(student_name, pretrained=False, num_classes=1000, **kwargs)
    teacher = timm.create_model(
        "resnet18" if quick else TEACHER, pretrained=False, num_classes=1000
    ).eval()
    ema = timm.utils.ModelEmaV3(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 1000, (batch,))

    def step() -> None:
        with torch.no_grad():
            teacher(images)
        loss = torch.nn.functional.cross_entropy(student(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(student)

    grid = 7 if not quick else 1
    output = TeacherOutput(
        dense_logits=torch.randn(batch, 1000, grid, grid), global_logits=torch.randn(batch, 1000)
    )

    def weights_check() -> None:
        non_finite(student.state_dict()) or non_finite(ema.module.state_dict())

    def teacher_check() -> None:
        teacher_non_finite(output, device=images.device).item()

    step()  # warm-up
    # side by side: each repeat measures all three in turn
    rounds = [
        (
            median_seconds(step, 1),
            median_seconds(weights_check, 3),
            median_seconds(teacher_check, 3),
        )
        for _ in range(repeats)
    ]
    step_s, weights_s, teacher_s = (statistics.median(column) for column in zip(*rounds))
    return {
        "student": student_name,
        "teacher": "resnet18" if quick else TEACHER,
        "parameters": sum(p.numel() for p in student.parameters()),
        "batch": batch,
        "step_s": step_s,
        "weights_check_s": weights_s,
        "teacher_check_s": teacher_s,
        "weights_check_share_at_log_interval_50": weights_s / (50 * step_s),
        "teacher_check_share_per_step": teacher_s / step_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--results-dir", default="docs/results")
    arguments = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    quick = arguments.quick
    rows = [
        measure(name, quick=quick, batch=2 if quick else 4, repeats=2 if quick else 3)
        for name in STUDENTS
    ]
    command = "python benchmarks/finite_check.py" + (" --quick" if quick else "")
    results = {"command": command, "machine": f"{cpu_model()}, 1 thread", "rows": rows}
    stem = Path(arguments.results_dir) / ("finite_check" + ("_quick" if quick else ""))
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    lines = [
        "# What the non-finite checks cost beside a training step",
        "",
        f"- Command: `{command}`" + (" (quick mode: a smoke test, not a result)" if quick else ""),
        f"- Machine: {results['machine']}, torch {torch.__version__}; medians of side-by-side "
        "repeats",
        "- Step: teacher forward (no grad), student forward and backward, AdamW, EMA update, "
        "224 px" + (" (quick: 32 px, tiny models)" if quick else ""),
        "",
        "| student | batch | step (s) | weights check (ms) | its share at log_interval 50 | "
        "teacher-output check (ms) | its share per step |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['student']} | {row['batch']} | {row['step_s']:.2f} | "
            f"{1000 * row['weights_check_s']:.2f} | "
            f"{100 * row['weights_check_share_at_log_interval_50']:.3f}% | "
            f"{1000 * row['teacher_check_s']:.2f} | "
            f"{100 * row['teacher_check_share_per_step']:.3f}% |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
