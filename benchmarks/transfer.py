"""Transfer on real data: do CSKD-pretrained students fine-tune better on new classes?

Fashion-MNIST is cut in two by class. Students (``none``, ``deit``, ``cskd``) and their teacher
are pretrained on the first five classes (T-shirt/top, Trouser, Pullover, Dress, Coat); each
student is then fine-tuned (method ``none``, heads re-initialised: ``student.reset_head``) on
the other five (Sandal, Shirt, Sneaker, Bag, Ankle boot) with 100 labelled images per class, and
compared with the same student trained from scratch on those 500 images. One more pair is
fine-tuned at 48 px, larger than the 32 px it was pretrained at (position embeddings resampled).

Everything goes through the user's path: the script writes both halves as image folders
(greyscale PNG), and each run is ``cskd train`` on a folder with ``student.checkpoint`` set to
a run directory. Pretraining uses one seed; fine-tuning three (seed = initialisation of the new
heads, data order and augmentation; the 500 images stay the same). No choice is made on the
numbers reported: the protocol is fixed in advance, so the five classes' 5,000 official test
images serve directly as the reported split (``val/``).

    python benchmarks/transfer.py --threads 1     # about one core-hour; resumable
    python benchmarks/transfer.py --report-only   # the page from finished runs
    python benchmarks/transfer.py --folders-only  # only the image folders (README "Your own data")
    python benchmarks/transfer.py --quick --output-dir /tmp/t --results-dir /tmp/t
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model  # noqa: E402
from fashion_mnist import claim, read_results, write_results  # noqa: E402

from cskd.config import load_config
from cskd.data import FASHION_MNIST_CLASSES, FashionMNIST
from cskd.training.run import train

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "configs" / "fashion_mnist"
PRETRAIN_CLASSES, TRANSFER_CLASSES = range(0, 5), range(5, 10)
PRETRAIN_PER_CLASS, TRANSFER_PER_CLASS = 2000, 100
SEEDS = 3
GENERATED_START = "<!-- generated:start (benchmarks/transfer.py rewrites this block) -->"
GENERATED_END = "<!-- generated:end -->"

FOLDER = ["data.dataset=folder", "data.num_classes=5", "data.workers=0", "data.train_subset=0"]
PRETRAIN = ["optim.epochs=15", "optim.warmup_epochs=1", "train.eval_interval=5"]
FINETUNE = [  # the same protocol for every start, scratch included (our choice, fixed upfront)
    "distill.method=none",
    "data.batch_size=50",
    "optim.lr=5.0e-4",
    "optim.lr_batch_reference=50",
    "optim.epochs=50",
    "optim.warmup_epochs=5",
    "train.eval_interval=10",
    "train.ema=false",
    "train.log_interval=10",
]
QUICK = [
    "optim.epochs=1",
    "optim.warmup_epochs=0",
    "train.max_steps_per_epoch=2",
    "train.eval_max_batches=1",
    "train.eval_interval=1",
    "data.batch_size=8",
    "data.eval_batch_size=16",
]
TINY_STUDENT = "{img_size: 32, patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2}"
TINY_TEACHER = "{channels: [8, 16, 32, 64], output_stride: 8}"
STARTS = ("scratch", "none", "deit", "cskd")  # fine-tuning starts: random, or a pretrained run


def folder_name(index: int) -> str:
    return FASHION_MNIST_CLASSES[index].replace("/", "-").replace(" ", "_")


def write_folders(root: Path, *, quick: bool) -> dict[str, Path]:
    """The two halves as image folders (idempotent): ``pretrain`` (2,000 training images per
    class, a fixed random choice) and ``transfer`` (100 per class), each with the official test
    images of its classes as ``val/``."""
    folders = {"pretrain": root / "pretrain", "transfer": root / "transfer"}
    done = root / "complete.json"
    if done.exists():
        return folders
    per_class = {"pretrain": PRETRAIN_PER_CLASS, "transfer": TRANSFER_PER_CLASS}
    if quick:
        per_class = {"pretrain": 8, "transfer": 4}
    classes = {"pretrain": PRETRAIN_CLASSES, "transfer": TRANSFER_CLASSES}
    generator = torch.Generator().manual_seed(0)
    for split, source in (
        ("train", FashionMNIST(split="train")),
        ("val", FashionMNIST(split="test")),
    ):
        order = torch.randperm(len(source.labels), generator=generator)
        for half, folder in folders.items():
            for label in classes[half]:
                chosen = order[source.labels[order] == label]
                if split == "train":
                    chosen = chosen[: per_class[half]]
                elif quick:
                    chosen = chosen[:4]
                directory = folder / split / folder_name(label)
                directory.mkdir(parents=True, exist_ok=True)
                for index in chosen.tolist():
                    image = Image.fromarray(source.images[index].numpy(), mode="L")
                    image.save(directory / f"{index:05d}.png")
    done.write_text(json.dumps({"per_class": per_class}))
    return folders


def plan(folders: dict[str, Path], runs: Path, *, quick: bool) -> list[tuple[str, Path, list]]:
    """(key, recipe, overrides) of every run, in order: teacher, pretrained students, then
    the fine-tunes seed by seed (so a partial study already compares every start)."""
    tiny = QUICK if quick else []
    pre = [*FOLDER, f"data.root={folders['pretrain']}", *PRETRAIN, *tiny]
    teacher = [*pre, *(["student.kwargs=" + TINY_TEACHER] if quick else [])]
    students = [*pre, f"teacher.checkpoint={runs / 'teacher'}"]
    if quick:
        students += ["student.kwargs=" + TINY_STUDENT, "teacher.kwargs=" + TINY_TEACHER]
    items = [("teacher", RECIPES / "teacher.yaml", teacher)]
    items += [(f"pre-{m}", RECIPES / f"{m}.yaml", students) for m in ("none", "deit", "cskd")]
    fine = [*FOLDER, f"data.root={folders['transfer']}", *FINETUNE, *tiny]
    if quick:
        fine += ["student.kwargs=" + TINY_STUDENT]
    for seed in range(1 if quick else SEEDS):
        for size in (32, 48):
            for start in STARTS if size == 32 else ("scratch", "cskd"):
                overrides = [*fine, f"train.seed={seed}"]
                if start != "scratch":
                    overrides += [f"student.checkpoint={runs / f'pre-{start}'}"]
                    overrides += ["student.reset_head=true"]
                if size != 32:
                    overrides += [f"data.image_size={size}", f"student.kwargs.img_size={size}"]
                key = f"ft{size}-{start}-seed{seed}"
                items.append((key, RECIPES / "none.yaml", overrides))
    return items


def run(key: str, recipe: Path, overrides: list[str], runs: Path, results_path: Path) -> None:
    if key in read_results(results_path)["runs"]:
        return
    if not claim(runs / "claims", key):
        print(f"[transfer] {key}: another worker holds it", flush=True)
        return
    run_dir = runs / key
    overrides = [*overrides, f"train.output_dir={run_dir}", "train.resume=auto"]
    print(f"[transfer] {key}: training", flush=True)
    start = time.perf_counter()
    train(load_config(recipe, overrides))
    final_path = run_dir / "final_metrics.json"
    if not final_path.exists():
        raise SystemExit(f"[transfer] {key} stopped before its last epoch: rerun to resume it")
    last = json.loads(final_path.read_text())["last_epoch"]
    entry = {
        "recipe": str(recipe.relative_to(ROOT)),
        "overrides": [item.replace(str(ROOT) + "/", "") for item in overrides],
        "wall_s": time.perf_counter() - start,
        "test": {
            rule: last[rule] for rule in ("cls", "cls+dist", "cls+dist+patch") if rule in last
        },
        "log": [
            line.split(" ", 1)[1].replace(str(ROOT) + "/", "")
            for line in (run_dir / "train.log").read_text().splitlines()
            if "initialised from" in line or "re-initialised" in line or "resampled" in line
        ],
    }
    write_results(results_path, {"runs": {key: entry}})
    print(f"[transfer] {key}: {entry['test'].get('cls')} in {entry['wall_s']:.0f} s", flush=True)


def report(results: dict, *, command: str, quick: bool) -> str:
    runs = results["runs"]
    lines = [GENERATED_START, ""]
    if quick:
        lines += ["**Quick mode** (tiny models, a few steps): numbers are meaningless.", ""]
    lines += [f"Command: `{command}` on {cpu_model()}.", ""]
    lines += [
        "Pretraining on the first five classes (test images of those classes, last epoch):",
        "",
    ]
    lines += ["| run | rule | top-1 | wall (s) |", "|---|---|---|---|"]
    for key, rule in (
        ("teacher", "cls"),
        ("pre-none", "cls"),
        ("pre-deit", "cls+dist"),
        ("pre-cskd", "cls+dist+patch"),
    ):
        if key in runs:
            top1 = runs[key]["test"][rule]["top1"]
            lines.append(f"| {key} | {rule} | {top1:.2f} | {runs[key]['wall_s']:.0f} |")
    lines += [
        "",
        "Fine-tuning on the other five classes, 100 images each (rule cls; test images "
        "of those classes; mean ± std over seeds, and per seed):",
        "",
    ]
    lines += [
        "| size | start | seeds | top-1 | per seed | − scratch (paired) |",
        "|---|---|---|---|---|---|",
    ]
    for size in (32, 48):
        for start in STARTS:
            values = [
                runs[k]["test"]["cls"]["top1"]
                for s in range(SEEDS)
                if (k := f"ft{size}-{start}-seed{s}") in runs
            ]
            if not values:
                continue
            mean = statistics.mean(values)
            std = statistics.stdev(values) if len(values) > 1 else float("nan")
            gains = [
                runs[f"ft{size}-{start}-seed{s}"]["test"]["cls"]["top1"]
                - runs[f"ft{size}-scratch-seed{s}"]["test"]["cls"]["top1"]
                for s in range(SEEDS)
                if f"ft{size}-{start}-seed{s}" in runs and f"ft{size}-scratch-seed{s}" in runs
            ]
            gain = f"{statistics.mean(gains):+.2f}" if gains and start != "scratch" else "—"
            seeds = ", ".join(f"{v:.2f}" for v in values)
            lines.append(
                f"| {size} px | {start} | {len(values)} | {mean:.2f} ± {std:.2f} | "
                f"{seeds} | {gain} |"
            )
    example = [
        line.replace(str(ROOT) + "/", "") for line in runs.get("ft48-cskd-seed0", {}).get("log", [])
    ]
    if example:
        lines += ["", "What the 48 px fine-tune logged at its start:", "", "```", *example, "```"]
    lines += ["", GENERATED_END]
    return "\n".join(lines)


def write_report(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else "# Transfer on Fashion-MNIST\n\n"
    if GENERATED_START in text:
        head, rest = text.split(GENERATED_START, 1)
        text = head + block + rest.split(GENERATED_END, 1)[1]
    else:
        text = text + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=str(ROOT / "runs" / "benchmarks" / "transfer"))
    parser.add_argument("--results-dir", default=str(ROOT / "docs" / "results"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps (tests)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--folders-only", action="store_true", help="only write the two image folders (seconds)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = Path(args.output_dir)
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    name = "transfer_quick" if args.quick else "transfer"  # quick never touches the real page
    results_path = results_dir / f"{name}.json"
    if args.folders_only:
        for folder in write_folders(runs / "data", quick=args.quick).values():
            print(folder)
        return 0
    if not args.report_only:
        folders = write_folders(runs / "data", quick=args.quick)
        for key, recipe, overrides in plan(folders, runs, quick=args.quick):
            run(key, recipe, overrides, runs, results_path)
    command = "python benchmarks/transfer.py --threads 1" + (" --quick" if args.quick else "")
    block = report(read_results(results_path), command=command, quick=args.quick)
    write_report(results_dir / f"{name}.md", block)
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
