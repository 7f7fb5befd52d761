"""The paper's comparison in miniature: one CNN teacher, one ViT student, every distillation method.

Trains the teacher of ``configs/fashion_mnist/teacher.yaml``, then the student of
``configs/fashion_mnist/cskd.yaml`` with ``none``, DeiT hard distillation, CSKD with each CKF
schedule (``linear``, ``x2``, ``cos``), CSKD without CKF (``dense``: always local; ``global``:
always global) and the soft CSKD loss. Every finished run is appended to a JSON results file at
once, and finished runs are skipped when the script is started again (an interrupted run resumes
from its ``last.pt``). At the end it writes a Markdown report (the block between the
``generated`` markers is replaced, text around it is kept) and a plot of test top-1 per epoch.

    python benchmarks/fashion_mnist.py              # the full benchmark (about 1.5 h, 2 cores)
    python benchmarks/fashion_mnist.py --quick --output-dir /tmp/b --results-dir /tmp/b
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import cpu_model

from cskd.config import load_config
from cskd.training.run import train

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "configs" / "fashion_mnist"
RULES = ("cls", "cls+dist", "cls+dist+patch")
MAIN_METHODS = ("none", "deit", "cskd/linear", "cskd/dense")
GENERATED_START = "<!-- generated:start (benchmarks/fashion_mnist.py rewrites this block) -->"
GENERATED_END = "<!-- generated:end -->"

# The benchmark's own choices, on top of the recipes (see docs/results/fashion_mnist.md for why).
TEACHER_OVERRIDES = ["optim.epochs=10"]
STUDENT_OVERRIDES = ["optim.epochs=6", "optim.warmup_epochs=1"]
COMMON_OVERRIDES = ["data.workers=0", "train.log_interval=20"]
QUICK_OVERRIDES = [
    "optim.epochs=1",
    "optim.warmup_epochs=0",
    "train.max_steps_per_epoch=2",
    "train.eval_max_batches=1",
    "data.train_subset=64",
    "data.batch_size=16",
    "data.eval_batch_size=32",
    "data.workers=0",
]
QUICK_TEACHER = ["teacher.kwargs={channels: [8, 16, 32, 64], output_stride: 8}"]
QUICK_STUDENT = [
    "student.kwargs={img_size: 32, patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2}"
]


@dataclass(frozen=True)
class Variant:
    """One student run: a method (with its CKF schedule or loss kind) and a seed."""

    label: str  # the row of the results table, e.g. "cskd/linear"
    overrides: tuple[str, ...]
    seed: int

    @property
    def name(self) -> str:
        return f"{self.label.replace('/', '-')}-seed{self.seed}"


VARIANTS = {
    "none": ("distill.method=none", "train.best_rule=cls"),
    "deit": ("distill.method=deit", "train.best_rule=cls+dist"),
    "cskd/linear": ("distill.method=cskd", "distill.schedule=linear"),
    "cskd/dense": ("distill.method=cskd", "distill.schedule=dense"),
    "cskd/x2": ("distill.method=cskd", "distill.schedule=x2"),
    "cskd/cos": ("distill.method=cskd", "distill.schedule=cos"),
    "cskd/global": ("distill.method=cskd", "distill.schedule=global"),
    "cskd/soft": ("distill.method=cskd", "distill.schedule=linear", "distill.cskd_kind=soft"),
}


def plan(seeds: int) -> list[Variant]:
    """Run order: seed 0 of the main methods, the one-seed ablations, then the other seeds."""
    order = [Variant(label, VARIANTS[label], 0) for label in MAIN_METHODS]
    order += [Variant(label, VARIANTS[label], 0) for label in VARIANTS if label not in MAIN_METHODS]
    for seed in range(1, seeds):
        order += [Variant(label, VARIANTS[label], seed) for label in MAIN_METHODS]
    return order


def read_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def write_results(path: Path, results: dict) -> None:
    """Merge ``results`` into the file under a lock (several workers may share it), then write
    it next to its final name and rename, so a crash never leaves half a file."""
    directory = os.open(path.parent, os.O_RDONLY)  # the lock: the folder itself, no stray file
    try:
        fcntl.flock(directory, fcntl.LOCK_EX)
        merged = read_results(path)
        merged["runs"].update(results["runs"])
        results["runs"].update(merged["runs"])
        temporary = path.with_suffix(f".json.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(merged, indent=1))
        os.replace(temporary, path)
    finally:
        os.close(directory)  # closing releases the lock


def claim(claims: Path, key: str) -> bool:
    """Claim ``key`` for this process; False if a live process holds it. Lets several workers
    (start the script more than once) split the runs without training one twice."""
    claims.mkdir(parents=True, exist_ok=True)
    path = claims / key
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(path.read_text())
                if holder == os.getpid():
                    return True
                os.kill(holder, 0)
                return False  # alive
            except (ValueError, ProcessLookupError, FileNotFoundError):
                path.unlink(missing_ok=True)  # a stale claim of a process that is gone
                continue
        os.write(descriptor, str(os.getpid()).encode())
        os.close(descriptor)
        return True
    return False


def epoch_curve(run_dir: Path) -> list[dict]:
    """Per-epoch evaluation records of a run's metrics.jsonl: [{"epoch", rule: top1, ...}]."""
    curve = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("type") != "epoch":
            continue
        point = {"epoch": record["epoch"] + 1}
        point.update(
            {rule: value["top1"] for rule, value in record["eval"].items() if rule in RULES}
        )
        curve.append(point)
    return curve


def run_one(
    *, recipe: Path, overrides: list[str], run_dir: Path, results: dict, key: str, path: Path
) -> dict | None:
    """Train one configuration (resuming a half-finished one) and record it in ``results``;
    None when another worker has claimed it."""
    results["runs"].update(read_results(path)["runs"])  # what other workers have finished
    if key in results["runs"]:
        print(f"[benchmark] {key}: already finished, skipped", flush=True)
        return results["runs"][key]
    if not claim(run_dir.parent / "claims", key):
        print(f"[benchmark] {key}: another worker is training it, skipped", flush=True)
        return None
    overrides = [*overrides, f"train.output_dir={run_dir}", "train.resume=auto"]
    config = load_config(recipe, overrides)
    print(f"[benchmark] {key}: training ({' '.join(overrides)})", flush=True)
    start = time.perf_counter()
    train(config)
    finished = run_dir / "final_metrics.json"  # written only when the last epoch is done
    if not finished.exists():
        raise SystemExit(f"[benchmark] {key} stopped before its last epoch: rerun to resume it")
    final = json.loads(finished.read_text())["last_epoch"]
    entry = {
        "recipe": str(recipe.relative_to(ROOT)),
        "overrides": overrides,
        "wall_s": time.perf_counter() - start,
        "final": {rule: final[rule] for rule in RULES if rule in final},
        "curve": epoch_curve(run_dir),
    }
    results["runs"][key] = entry
    write_results(path, results)
    print(f"[benchmark] {key}: {entry['final']} in {entry['wall_s']:.0f} s", flush=True)
    return entry


def summarise(results: dict) -> dict:
    """{label: {rule: (mean, std, n)}} over the seeds of each variant (std: sample, n - 1)."""
    table: dict[str, dict] = {}
    for key, entry in results["runs"].items():
        if key == "teacher":
            continue
        label = key.rsplit("-seed", 1)[0].replace("-", "/", 1)
        for rule, value in entry["final"].items():
            table.setdefault(label, {}).setdefault(rule, []).append(value["top1"])
    return {
        label: {
            rule: (
                statistics.mean(values),
                statistics.stdev(values) if len(values) > 1 else math.nan,
                len(values),
            )
            for rule, values in rules.items()
        }
        for label, rules in table.items()
    }


def plot(results: dict, path: Path) -> None:
    """Test top-1 per epoch (mean over seeds, shaded min-max) of the main methods."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6.4, 4.2))
    for label in MAIN_METHODS:
        rule = "cls" if label == "none" else ("cls+dist" if label == "deit" else "cls+dist+patch")
        curves = [
            entry["curve"]
            for key, entry in results["runs"].items()
            if key.rsplit("-seed", 1)[0] == label.replace("/", "-")
        ]
        if not curves:
            continue
        length = min(len(curve) for curve in curves)
        epochs = [curves[0][i]["epoch"] for i in range(length)]
        values = [[curve[i][rule] for curve in curves] for i in range(length)]
        means = [statistics.mean(column) for column in values]
        (line,) = axes.plot(
            epochs, means, marker="o", label=f"{label} ({rule}, {len(curves)} seeds)"
        )
        axes.fill_between(
            epochs,
            [min(c) for c in values],
            [max(c) for c in values],
            alpha=0.2,
            color=line.get_color(),
        )
    teacher = results["runs"].get("teacher")
    if teacher:
        axes.axhline(teacher["final"]["cls"]["top1"], color="gray", linestyle="--", label="teacher")
    axes.set_xlabel("epoch")
    axes.set_ylabel("test top-1 (%)")
    axes.set_title("Fashion-MNIST, ViT student, 10,000 training images")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def report(results: dict, *, command: str, quick: bool) -> str:
    """The generated block of the Markdown report."""
    teacher = results["runs"].get("teacher")
    wall = sum(entry["wall_s"] for entry in results["runs"].values())
    lines = [
        GENERATED_START,
        "",
        f"- Command: `{command}`" + (" (quick mode: a smoke test, not a result)" if quick else ""),
        f"- Machine: {os.cpu_count()} CPU cores ({cpu_model()}), shared with other jobs; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"- Wall time: {wall / 60:.1f} min of training and evaluation over "
        f"{len(results['runs'])} runs (the sum of each run's wall time)",
    ]
    if teacher:
        lines.append(
            f"- Teacher (resnet18, 10 epochs): test top-1 **{teacher['final']['cls']['top1']:.2f}%**"
        )
    lines += [
        "",
        "Test top-1 (%) at the last epoch, mean ± std over seeds (n = number of seeds). `—`: the"
        " rule uses a head the method does not train.",
        "",
        "| method | n | cls | cls+dist | cls+dist+patch |",
        "|---|---|---|---|---|",
    ]
    summary = summarise(results)
    order = [*MAIN_METHODS, *(label for label in VARIANTS if label not in MAIN_METHODS)]
    for label in order:
        if label not in summary:
            continue
        cells = []
        for rule in RULES:
            if rule not in summary[label] or (label == "none" and rule != "cls"):
                cells.append("—")
                continue
            mean, std, count = summary[label][rule]
            cells.append(f"{mean:.2f}" + (f" ± {std:.2f}" if count > 1 else ""))
        count = max(value[2] for value in summary[label].values())
        lines.append(f"| {label} | {count} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per run (test top-1 at the last epoch, cls / cls+dist / cls+dist+patch, wall time):",
        "",
    ]
    for key, entry in results["runs"].items():
        shown = " / ".join(f"{value['top1']:.2f}" for value in entry["final"].values())
        lines.append(f"- `{key}`: {shown} ({entry['wall_s']:.0f} s)")
    lines += ["", "![test top-1 per epoch](fashion_mnist.png)", "", GENERATED_END]
    return "\n".join(lines)


def write_report(path: Path, block: str) -> None:
    """Replace the generated block of ``path`` (or create the file around it)."""
    if path.exists() and GENERATED_START in path.read_text():
        text = path.read_text()
        before = text.split(GENERATED_START, 1)[0]
        after = text.split(GENERATED_END, 1)[1] if GENERATED_END in text else "\n"
        path.write_text(before + block + after)
    else:
        path.write_text(
            "# Fashion-MNIST: CSKD vs DeiT distillation vs no teacher\n\n" + block + "\n"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two steps per variant: a smoke test")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the main methods")
    parser.add_argument("--output-dir", default="runs/benchmarks/fashion_mnist", help="run folders")
    parser.add_argument("--results-dir", default="docs/results", help="JSON, Markdown and PNG")
    parser.add_argument(
        "--report-only", action="store_true", help="write the report from the finished runs only"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    arguments = parser.parse_args(argv)
    if arguments.threads:
        torch.set_num_threads(arguments.threads)

    output_dir, results_dir = Path(arguments.output_dir), Path(arguments.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    name = "fashion_mnist_quick" if arguments.quick else "fashion_mnist"
    results_path = results_dir / f"{name}.json"
    results = read_results(results_path)
    teacher_overrides = [*COMMON_OVERRIDES, *TEACHER_OVERRIDES]
    student_overrides = [*COMMON_OVERRIDES, *STUDENT_OVERRIDES]
    if arguments.quick:
        teacher_overrides += [*QUICK_OVERRIDES, *QUICK_TEACHER]
        teacher_overrides += [o.replace("teacher.kwargs", "student.kwargs") for o in QUICK_TEACHER]
        student_overrides += [*QUICK_OVERRIDES, *QUICK_TEACHER, *QUICK_STUDENT]
    teacher_dir = output_dir / "teacher"

    variants = [] if arguments.report_only else plan(1 if arguments.quick else arguments.seeds)
    while not arguments.report_only and not run_one(
        recipe=RECIPES / "teacher.yaml",
        overrides=teacher_overrides,
        run_dir=teacher_dir,
        results=results,
        key="teacher",
        path=results_path,
    ):
        time.sleep(10)  # another worker is training the teacher: wait for it
    checkpoint = teacher_dir / "student.safetensors"
    for variant in variants:
        run_one(
            recipe=RECIPES / "cskd.yaml",
            overrides=[
                *student_overrides,
                *variant.overrides,
                f"teacher.checkpoint={checkpoint}",
                f"train.seed={variant.seed}",
            ],
            run_dir=output_dir / variant.name,
            results=results,
            key=variant.name,
            path=results_path,
        )

    results["runs"].update(read_results(results_path)["runs"])  # other workers' runs
    command = "python benchmarks/fashion_mnist.py " + " ".join(argv or sys.argv[1:])
    plot(results, results_dir / f"{name}.png")
    write_report(
        results_dir / f"{name}.md", report(results, command=command.strip(), quick=arguments.quick)
    )
    print(f"[benchmark] wrote {results_dir / name}.{{json,md,png}}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
