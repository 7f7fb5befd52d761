"""A hierarchical student on the Fashion-MNIST miniature: a small Swin trained with no teacher,
DeiT distillation and CSKD (its dense targets through a ``MapStudent`` distillation head on the
final map), from the demo's ResNet-18 teacher, on the demo's data and schedule.

The Swin (patch 2, window 4, three stages of 2 blocks, widths 32/64/128) ends in a 4 x 4 map at
32 px, the teacher's grid. Under ``deit`` it is a plain classifier: DeiT's token target trains
its one head (logit distillation), as for any student without a distillation token. Every
finished run is appended to the JSON results at once and skipped when the script starts again;
an interrupted run resumes from its ``last.pt``.

    python benchmarks/hierarchical_student.py --threads 1       # about 25 min on 2 shared cores
    python benchmarks/hierarchical_student.py --quick --output-dir /tmp/h --results-dir /tmp/h
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model  # noqa: E402
from fashion_mnist import claim, read_results, write_results  # noqa: E402

from cskd.config import load_config
from cskd.training.run import train

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "configs" / "fashion_mnist"
RULES = ("cls", "cls+dist", "cls+dist+patch")
SWIN = [
    "student.name=swin_tiny_patch4_window7_224",
    "student.kwargs={img_size: 32, patch_size: 2, window_size: 4, embed_dim: 32, "
    "depths: [2, 2, 2], num_heads: [2, 4, 8]}",
]
METHODS = {  # label -> the overrides of configs/fashion_mnist/cskd.yaml
    "none": ["distill.method=none"],
    "deit": ["distill.method=deit"],
    "cskd/linear": ["distill.method=cskd", "distill.schedule=linear"],
}
QUICK = ["train.max_steps_per_epoch=2", "train.eval_max_batches=1", "optim.epochs=1"]
QUICK += ["optim.warmup_epochs=0"]


def run(label: str, overrides: list[str], recipe: str, run_dir: Path) -> dict:
    """Train one run (resuming it if interrupted); its test top-1 per rule and its wall time."""
    config = load_config(RECIPES / recipe, [*overrides, f"train.output_dir={run_dir}"])
    config.train.resume = "auto"
    started = time.perf_counter()
    metrics = train(config)
    return {
        "label": label,
        "overrides": overrides,
        "test_top1": {rule: metrics[rule]["top1"] for rule in RULES if rule in metrics},
        "wall_s": round(time.perf_counter() - started, 1),
    }


START = "<!-- generated:start (benchmarks/hierarchical_student.py rewrites this block) -->"
END = "<!-- generated:end -->"


def write_page(path: Path, block: str) -> None:
    """Replace the generated block of ``path`` (kept: the text around it), or start the page."""
    title = "# A hierarchical student: Swin on the Fashion-MNIST miniature\n\n"
    text = path.read_text() if path.exists() else f"{title}{START}\n{END}\n"
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    path.write_text(f"{before}{START}\n\n{block}\n{END}{after}")


def report(results: dict, *, command: str) -> str:
    lines = [
        "- Command: `" + command + "`",
        f"- Machine: {cpu_model()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s) per process",
        "- Data, teacher and schedule: the demo's (`configs/fashion_mnist/`: 10,000 training "
        "images, 6 epochs, the 5-epoch ResNet-18 teacher with its 4 x 4 map at 32 px); the "
        "student a small Swin (patch 2, window 4, depths 2-2-2, widths 32-64-128, 0.57 M "
        "parameters) whose final map is 4 x 4. One seed.",
        "",
        "Test top-1 (%) at the last epoch. `—`: a head the run does not have (under `none` and "
        "`deit` the Swin has only its class head).",
        "",
        "| run | " + " | ".join(RULES) + " | wall time |",
        "|---" * (len(RULES) + 2) + "|",
    ]
    for key, result in results["runs"].items():
        cells = []
        for rule in RULES:
            value = result["test_top1"].get(rule)
            has_head = key.startswith("cskd") or rule == "cls" or key == "teacher"
            cells.append(f"{value:.2f}" if value is not None and has_head else "—")
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {result['wall_s'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two steps per run: a smoke test")
    parser.add_argument("--output-dir", default="runs/benchmarks/hierarchical_student")
    parser.add_argument("--results-dir", default="docs/results")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    output, results_dir = Path(args.output_dir), Path(args.results_dir)
    name = "hierarchical_student" + ("_quick" if args.quick else "")
    path = results_dir / f"{name}.json"
    results = read_results(path)
    results.setdefault("runs", {})
    extra = QUICK if args.quick else []
    teacher = output / "teacher"
    plan = [("teacher", [*extra], "teacher.yaml", teacher)]
    checkpoint = f"teacher.checkpoint={teacher / 'student.safetensors'}"
    for label, overrides in METHODS.items():
        plan.append((label, [*SWIN, *overrides, checkpoint, *extra], "cskd.yaml", output / label))
    for label, overrides, recipe, run_dir in plan:
        if label in results["runs"] or not claim(output / "claims", label.replace("/", "-")):
            continue
        results = read_results(path)
        results.setdefault("runs", {})[label] = run(label, overrides, recipe, run_dir)
        write_results(path, results)
        print(f"[hierarchical] {label}: {results['runs'][label]['test_top1']}", flush=True)
    command = "python benchmarks/hierarchical_student.py " + " ".join(argv or sys.argv[1:])
    write_page(results_dir / f"{name}.md", report(read_results(path), command=command.strip()))
    print(f"[hierarchical] wrote {results_dir / name}.{{json,md}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
