"""Training throughput of the student alone, DeiT distillation and CSKD, side by side.

For each student/teacher pair, three trainers are built from the same config through the real code
(``cskd.training.build`` / ``cskd.training.models`` builders, :class:`cskd.method.distiller.Distiller`, :meth:`cskd.training.engine.Trainer.step`), with
the same initial student weights, the same frozen teacher and the same synthetic batch. The timed
blocks are interleaved (rep 1: none, deit, cskd, teacher forward; rep 2: ...), so slow phases of a
shared machine hit every method alike; the report gives the median images/s over repetitions, the
spread (min-max), CSKD's step time relative to DeiT's, and the teacher forward's share of the DeiT
step.

    python benchmarks/throughput.py                        # the CPU pairs
    python benchmarks/throughput.py --device cuda --pairs deit_ti_regnety_160 deit_s_regnety_160
    python benchmarks/throughput.py --quick --results-dir /tmp/t    # a smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from common import cpu_model

from cskd.config import Config, load_config
from cskd.method.adapters import DenseTeacher
from cskd.method.align import align_to_grid
from cskd.method.distiller import normalizer
from cskd.method.losses import cskd_loss
from cskd.training.build import (
    amp_dtype,
    build_batch_augmentation,
    build_distiller,
    build_optimization,
    scaled_lr,
    seed_everything,
)
from cskd.training.engine import Trainer
from cskd.training.models import build_student
from cskd.training.state import TrainState

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("none", "deit", "cskd")


@dataclass(frozen=True)
class Pair:
    """A student/teacher pair at one resolution and batch size."""

    description: str
    recipe: str  # a recipe for everything not overridden here ("" = the defaults)
    overrides: tuple[str, ...]
    batch_size: int


PAIRS = {
    # The Fashion-MNIST benchmark pair: 8 x 8 student grid pooled 2 x 2 to the 4 x 4 teacher map.
    "fashion_mnist": Pair(
        "DeiT (embed 64, depth 4, patch 4) / ResNet-18 (narrow, stride 8), 32 px, 1 channel",
        "configs/fashion_mnist/cskd.yaml",
        (),
        128,
    ),
    # The paper's geometry at CPU cost: DeiT-Ti at 224 px (14 x 14) with a tiny RegNetY (7 x 7).
    "deit_ti_regnety_002": Pair(
        "DeiT-Ti / RegNetY-200MF, 224 px, ImageNet recipe (Mixup/CutMix, erasing)",
        "",
        ("student.name=deit_tiny_distilled_patch16_224", "teacher.name=regnety_002"),
        32,
    ),
    # The paper's pairs (GPU).
    "deit_ti_regnety_160": Pair(
        "DeiT-Ti / RegNetY-16GF, 224 px, ImageNet recipe",
        "",
        ("student.name=deit_tiny_distilled_patch16_224", "teacher.name=regnety_160"),
        256,
    ),
    "deit_s_regnety_160": Pair(
        "DeiT-S / RegNetY-16GF, 224 px, ImageNet recipe",
        "",
        ("student.name=deit_small_distilled_patch16_224", "teacher.name=regnety_160"),
        256,
    ),
}
CPU_PAIRS = ("fashion_mnist", "deit_ti_regnety_002")
QUICK_OVERRIDES = (
    "student.kwargs={img_size: 32, patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2}",
    "teacher.kwargs={channels: [8, 16, 32, 64], output_stride: 8}",
)


def pair_config(pair: Pair, *, batch_size: int, device: str, extra: list[str]) -> Config:
    overrides = [*pair.overrides, f"data.batch_size={batch_size}", f"train.device={device}"]
    overrides += ["data.dataset=synthetic", "train.ema=false", *extra]
    return load_config(ROOT / pair.recipe if pair.recipe else None, overrides)


def build_teacher_model(config: Config, device: torch.device) -> DenseTeacher:
    """The pair's teacher with random weights (throughput does not depend on them)."""
    model = timm.create_model(
        config.teacher.name,
        pretrained=False,
        num_classes=config.data.num_classes,
        in_chans=config.data.in_chans,
        **config.teacher.kwargs,
    )
    teacher = DenseTeacher(
        model, name=config.teacher.name, mean=config.teacher.mean, std=config.teacher.std
    )
    return teacher.to(device)


def build_trainer(
    config: Config, method: str, student: torch.nn.Module, teacher: DenseTeacher | None, device
) -> tuple[Trainer, torch.nn.Module]:
    """A Trainer exactly as :func:`cskd.training.run.train` assembles it (no EMA, no logging)."""
    student = copy.deepcopy(student)
    lr = scaled_lr(config.optim, config.data.batch_size)
    optimizer, scheduler = build_optimization(config.optim, student, lr=lr, steps_per_epoch=10_000)
    erasing, mixup = build_batch_augmentation(config, device)
    student_norm = normalizer(config.data.mean, config.data.std, device)
    trained = torch.compile(student) if config.train.compile else student
    distiller = build_distiller(
        config, trained, teacher, device=device, mixup=mixup is not None, method=method
    )
    distiller.train()
    trainer = Trainer(
        distiller=distiller,
        optimizer=optimizer,
        scheduler=scheduler,
        device=device,
        epochs=1,
        steps_per_epoch=10_000,
        progress_unit=config.distill.progress,
        mixup=mixup,
        erasing=erasing,
        amp_dtype=amp_dtype(config.train, device),
        clip_grad=config.optim.clip_grad,
        student_norm=student_norm,
    )
    return trainer, distiller


def teacher_input(distiller, images: torch.Tensor) -> torch.Tensor:
    """The student's batch renormalised for the teacher, as the distiller does."""
    mean, std = distiller.student_mean, distiller.student_std
    return distiller.teacher.renormalize(images, mean=mean, std=std)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_pair(
    name: str,
    pair: Pair,
    *,
    batch_size: int,
    device: torch.device,
    repeats: int,
    steps: int,
    warmup: int,
    extra: list[str],
    profile_steps: int = 0,
) -> dict:
    """Interleaved timing of one pair; returns per-method images/s lists and the teacher's."""
    config = pair_config(pair, batch_size=batch_size, device=str(device), extra=extra)
    seed_everything(0)
    student = build_student(config).to(device)
    teacher = build_teacher_model(config, device)
    if config.train.channels_last:
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
    trainers = {
        method: build_trainer(config, method, student, teacher, device)[0] for method in METHODS
    }
    shape = (batch_size, config.data.in_chans, config.data.image_size, config.data.image_size)
    generator = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.rand(shape, generator=generator).to(device),
        "target": torch.randint(0, config.data.num_classes, (batch_size,), generator=generator).to(
            device
        ),
    }
    teacher_trainer = trainers["deit"]
    states = {method: TrainState() for method in METHODS}

    def run_steps(method: str, count: int) -> None:
        for _ in range(count):
            trainers[method].step(batch, states[method])

    def teacher_forward(count: int) -> None:
        distiller = teacher_trainer.distiller
        with torch.no_grad(), teacher_trainer.autocast():
            for _ in range(count):
                images, _, _ = teacher_trainer.prepare(batch)
                distiller.teacher(teacher_input(distiller, images))

    branch = cskd_branch(trainers["cskd"], batch)
    for method in METHODS:
        run_steps(method, warmup)
    teacher_forward(warmup)
    branch(warmup)
    synchronize(device)
    if profile_steps:
        return {"pair": name, **profile(trainers, batch, states, steps=profile_steps)}
    blocks = (*METHODS, "teacher", "cskd_branch")
    timings: dict[str, list[float]] = {method: [] for method in blocks}
    cpu_timings: dict[str, list[float]] = {method: [] for method in timings}
    for _ in range(repeats):
        for method in blocks:
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            if method == "teacher":
                teacher_forward(steps)
            elif method == "cskd_branch":
                branch(steps)
            else:
                run_steps(method, steps)
            synchronize(device)
            timings[method].append((time.perf_counter() - start) / steps)  # s per step
            cpu_timings[method].append((time.process_time() - cpu_start) / steps)
    return {
        "pair": name,
        "description": pair.description,
        "batch_size": batch_size,
        "image_size": config.data.image_size,
        "amp": str(amp_dtype(config.train, device)),
        "compile": config.train.compile,
        "channels_last": config.train.channels_last,
        "seconds_per_step": timings,
        # CPU seconds this process used per step: on a shared CPU, time other jobs take the cores
        # does not count, so ratios of it are steadier than wall-clock ratios (CPU device only).
        "cpu_seconds_per_step": cpu_timings if device.type == "cpu" else None,
    }


def profile(trainers: dict, batch: dict, states: dict, *, steps: int) -> dict:
    """Self time per operator (ms per step) of DeiT and CSKD steps, and their difference.

    The steps alternate (deit, cskd, deit, ...) under one profiler, so interference from other
    jobs is shared; operators are summed over the steps of each method.
    """
    per_method: dict[str, dict[str, float]] = {"deit": {}, "cskd": {}}
    calls: dict[str, dict[str, int]] = {"deit": {}, "cskd": {}}
    for _ in range(steps):
        for method in per_method:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                trainers[method].step(batch, states[method])
            for event in prof.key_averages():
                table = per_method[method]
                table[event.key] = table.get(event.key, 0.0) + event.self_cpu_time_total / 1000
                calls[method][event.key] = calls[method].get(event.key, 0) + event.count
    totals = {method: sum(table.values()) / steps for method, table in per_method.items()}
    keys = set(per_method["deit"]) | set(per_method["cskd"])
    difference = {
        key: (per_method["cskd"].get(key, 0.0) - per_method["deit"].get(key, 0.0)) / steps
        for key in keys
    }
    top = sorted(difference.items(), key=lambda item: -abs(item[1]))[:15]
    only_cskd = sorted(
        (key, per_method["cskd"][key] / steps)
        for key in set(per_method["cskd"]) - set(per_method["deit"])
    )
    linear_calls = {method: calls[method].get("aten::linear", 0) // steps for method in calls}
    return {
        "ms_per_step": totals,
        "largest_differences_ms": top,
        "only_in_cskd_ms": only_cskd,
        "linear_calls_per_step": linear_calls,
    }


def cskd_branch(trainer: Trainer, batch: dict):
    """The work a CSKD step adds to a DeiT step, alone: pool the patch tokens to the teacher grid,
    apply the distillation head, the CSKD loss, and its backward to the tokens.

    Built from the library's own pieces (``align_to_grid``, the student's ``patch_head``,
    ``cskd_loss``) on fixed tokens and teacher logits; ``blocks(count)`` runs it ``count`` times.
    Its time over the DeiT step is a noise-robust measure of CSKD's extra cost, since the rest of
    the two steps is the same code.
    """
    distiller = trainer.distiller
    student = (
        distiller.student._orig_mod
        if hasattr(distiller.student, "_orig_mod")
        else distiller.student
    )
    weights = distiller.weights
    with torch.no_grad(), trainer.autocast():
        images, _, _ = trainer.prepare(batch)
        teacher = distiller.teacher(teacher_input(distiller, images))
        tokens = student.model.forward_features(images)  # (N, P + M, D)
    teacher_grid = tuple(teacher.dense_logits.shape[-2:])
    tokens = tokens.detach().requires_grad_(True)

    def blocks(count: int) -> None:
        for _ in range(count):
            with trainer.autocast():
                patches = tokens[:, student.model.num_prefix_tokens :]  # (N, M, D)
                pooled = align_to_grid(patches, student.grid_size, teacher_grid)  # (N, H*W, D)
                logits = student.patch_head(pooled)  # (N, H*W, K)
                loss = cskd_loss(
                    logits,
                    teacher.dense_logits.float(),
                    teacher.global_logits.float(),
                    0.5,
                    kind=weights.cskd_kind,
                    schedule=weights.schedule,
                    tau=weights.tau,
                    student_grid=teacher_grid,
                )
            loss.backward()
            tokens.grad = None

    return blocks


def summarise(result: dict) -> dict:
    """Median images/s with min-max spread per method, CSKD vs DeiT, and the teacher's share."""
    batch = result["batch_size"]
    times = result["seconds_per_step"]
    rows = {}
    for method in (*METHODS, "teacher", "cskd_branch"):
        median = statistics.median(times[method])
        rows[method] = {
            "images_per_s": batch / median,
            "min": batch / max(times[method]),
            "max": batch / min(times[method]),
            "ms_per_step": 1000 * median,
        }
    # The ratio per repetition (both timed back to back), then its median: robust to slow phases.
    ratios = [c / d for c, d in zip(times["cskd"], times["deit"], strict=True)]
    shares = [t / d for t, d in zip(times["teacher"], times["deit"], strict=True)]
    summary = {
        "rows": rows,
        "cskd_over_deit": statistics.median(ratios),
        "cskd_over_deit_quartiles": quartiles(ratios),
        # Ratio of the fastest repetitions: interference only ever adds time, so the minimum is
        # the estimate least disturbed by other jobs on a shared machine.
        "cskd_over_deit_best": min(times["cskd"]) / min(times["deit"]),
        "teacher_share_of_deit_step": statistics.median(shares),
        "cskd_branch_share_of_deit_step": statistics.median(
            [b / d for b, d in zip(times["cskd_branch"], times["deit"], strict=True)]
        ),
    }
    cpu = result.get("cpu_seconds_per_step")
    if cpu:
        cpu_ratios = [c / d for c, d in zip(cpu["cskd"], cpu["deit"], strict=True)]
        summary["cpu_cskd_over_deit"] = statistics.median(cpu_ratios)
        summary["cpu_cskd_over_deit_quartiles"] = quartiles(cpu_ratios)
        summary["cpu_cskd_over_deit_best"] = min(cpu["cskd"]) / min(cpu["deit"])
    return summary


def quartiles(values: list[float]) -> tuple[float, float]:
    """(first, third) quartile; (min, max) for fewer than four values."""
    if len(values) < 4:
        return min(values), max(values)
    first, _, third = statistics.quantiles(values, n=4)
    return first, third


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return (
        f"{os.cpu_count()} CPU cores ({cpu_model()}), {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )


def table(results: list[dict]) -> str:
    lines = [
        "| pair | batch | amp | compile | student alone (img/s) | DeiT (img/s) | CSKD (img/s) "
        "| CSKD / DeiT step, wall | CSKD / DeiT step, CPU time | CSKD-only work / DeiT step "
        "| teacher fwd share of DeiT step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        summary = summarise(result)
        cells = []
        for method in METHODS:
            row = summary["rows"][method]
            cells.append(f"{row['images_per_s']:.0f} ({row['min']:.0f}–{row['max']:.0f})")
        low, high = summary["cskd_over_deit_quartiles"]
        cells.append(
            f"{summary['cskd_over_deit']:.3f} (IQR {low:.3f}–{high:.3f}; "
            f"fastest {summary['cskd_over_deit_best']:.3f})"
        )
        if "cpu_cskd_over_deit" in summary:
            low, high = summary["cpu_cskd_over_deit_quartiles"]
            cells.append(
                f"{summary['cpu_cskd_over_deit']:.3f} (IQR {low:.3f}–{high:.3f}; "
                f"fastest {summary['cpu_cskd_over_deit_best']:.3f})"
            )
        else:
            cells.append("—")
        cells.append(f"{100 * summary['cskd_branch_share_of_deit_step']:.2f}%")
        lines.append(
            f"| {result['pair']} | {result['batch_size']} | {result['amp']} | {result['compile']} | "
            + " | ".join(cells)
            + f" | {100 * summary['teacher_share_of_deit_step']:.0f}% |"
        )
    return "\n".join(lines)


def write_report(path: Path, text: str, *, block_name: str) -> None:
    """Replace the block named ``block_name`` in ``path``, append it, or create the file."""
    start = f"<!-- generated:{block_name} start (benchmarks/throughput.py rewrites this block) -->"
    end = f"<!-- generated:{block_name} end -->"
    block = f"{start}\n\n{text}\n{end}"
    current = (
        path.read_text() if path.exists() else "# Training throughput: student alone, DeiT, CSKD\n"
    )
    if start in current and end in current:
        before, rest = current.split(start, 1)
        path.write_text(before + block + rest.split(end, 1)[1])
    else:
        path.write_text(current.rstrip("\n") + "\n\n" + block + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=list(CPU_PAIRS), choices=sorted(PAIRS))
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=0, help="0 = each pair's own")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repetitions")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument(
        "--profile", type=int, default=0, help="N > 0: profile N DeiT and CSKD steps instead"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny model, 1 repetition")
    parser.add_argument("--results-dir", default="docs/results")
    parser.add_argument("--name", default="throughput", help="JSON name and report block name")
    parser.add_argument("--report", default="throughput.md", help="Markdown file in results-dir")
    parser.add_argument("overrides", nargs="*", help="config key=value (train.amp=bf16, ...)")
    arguments = parser.parse_args(argv)

    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    device = torch.device(arguments.device)
    extra = list(arguments.overrides)
    pairs = arguments.pairs
    if arguments.quick:
        pairs, extra = ["fashion_mnist"], [*extra, *QUICK_OVERRIDES]
        arguments.repeats, arguments.steps, arguments.warmup = 2, 1, 1
    results = []
    for name in pairs:
        pair = PAIRS[name]
        batch_size = arguments.batch_size or (8 if arguments.quick else pair.batch_size)
        print(f"[throughput] {name}: batch {batch_size} on {device}", flush=True)
        result = measure_pair(
            name,
            pair,
            batch_size=batch_size,
            device=device,
            repeats=arguments.repeats,
            steps=arguments.steps,
            warmup=arguments.warmup,
            extra=extra,
            profile_steps=arguments.profile,
        )
        results.append(result)
        if arguments.profile:
            print(json.dumps(result, indent=1), flush=True)
            continue
        summary = summarise(result)
        print(
            f"[throughput] {name}: "
            + ", ".join(f"{m} {summary['rows'][m]['images_per_s']:.0f} img/s" for m in METHODS)
            + f"; CSKD/DeiT step {summary['cskd_over_deit']:.3f}; teacher share "
            f"{100 * summary['teacher_share_of_deit_step']:.0f}%",
            flush=True,
        )

    results_dir = Path(arguments.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    if arguments.profile:
        (results_dir / f"{arguments.name}_profile.json").write_text(json.dumps(results, indent=1))
        return 0
    command = "python benchmarks/throughput.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    record = {
        "command": command.strip(),
        "machine": machine(device),
        "repeats": arguments.repeats,
        "steps": arguments.steps,
        "results": results,
    }
    (results_dir / f"{arguments.name}.json").write_text(json.dumps(record, indent=1))
    text = (
        f"- Command: `{record['command']}`\n- Machine: {record['machine']}\n"
        f"- {arguments.repeats} interleaved repetitions of {arguments.steps} steps per method; "
        "median images/s (min–max over repetitions); step-time ratios: median over repetitions of "
        "the per-repetition ratio (interquartile range; ratio of the fastest repetitions)\n\n"
        + table(results)
        + "\n"
    )
    write_report(results_dir / arguments.report, text, block_name=arguments.name)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
