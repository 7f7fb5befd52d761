"""The training step's speed path, side by side: the teacher online against its cache, and (on a
GPU) the release's way of running a step against this library's.

For one student/teacher pair, one CSKD trainer per *way* is built through the real code
(``cskd.training.build`` / ``cskd.training.models`` builders and ``place_teacher``, ``Trainer.step``) from the same initial student
weights and the same frozen teacher, on one fixed synthetic batch with random crop boxes and
flips. The ways are timed interleaved (each repetition runs every way once), so a slow phase of
a shared machine hits them all alike; reported are the median images/s (min-max) and the median
over repetitions of each per-repetition step-time ratio.

Ways (``--ways``):

- ``online``: the recipe as it runs on this device (CPU: fp32, no compile).
- ``cached``: ``online`` with the teacher's targets from a cache (no teacher forward).
- ``release``: the CSKD release's way: fp16 autocast for student and teacher, a gradient scaler,
  no compile, channels-first.
- ``ours``: bf16 autocast for the student, the teacher in fp16 (teacher.amp=auto on a GPU,
  docs/results/teacher_precision.md), ``train.compile`` for both, the teacher channels-last.
- ``ours+cache``: ``ours`` with the teacher's targets from a cache.

It also builds a real cache (``cskd cache``) over ``--cache-images`` synthetic images with the
pair's teacher and reports its time per image and its bytes per image, every logit in float16
and the top-10, with what that means for ImageNet-1k (1,281,167 images).

    python benchmarks/speed_path.py --threads 1                 # CPU: online vs cached
    python benchmarks/speed_path.py --device cuda --pairs deit_ti_regnety_160 deit_s_regnety_160 \
        --ways release ours ours+cache --name gpu_speed_path
    python benchmarks/speed_path.py --quick --results-dir /tmp/s   # a smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import memory_cache
from throughput import (  # noqa: E402
    PAIRS,
    QUICK_OVERRIDES,
    build_trainer,
    machine,
    pair_config,
    quartiles,
    synchronize,
    write_report,
)

from cskd.commands.cache import build_cache
from cskd.config import load_config
from cskd.method.adapters import DenseTeacher
from cskd.teacher.cached import CachedTeacher
from cskd.teacher.store import TeacherCache, open_cache
from cskd.training.build import seed_everything
from cskd.training.models import build_student, place_teacher
from cskd.training.state import TrainState

ROOT = Path(__file__).resolve().parent.parent
IMAGENET_TRAIN_IMAGES = 1_281_167
WAYS = {  # way -> (config overrides, targets from a cache)
    "online": ((), False),
    "cached": ((), True),
    "release": (("train.amp=fp16", "teacher.amp=fp16", "teacher.memory_format=contiguous"), False),
    "ours": (
        (
            "train.amp=bf16",
            "teacher.amp=fp16",
            "train.compile=true",
            "teacher.memory_format=channels_last",
        ),
        False,
    ),
    "ours+cache": (
        (
            "train.amp=bf16",
            "teacher.amp=fp16",
            "train.compile=true",
            "teacher.memory_format=channels_last",
        ),
        True,
    ),
}
RATIOS = (
    ("online", "cached"),
    ("release", "ours"),
    ("release", "ours+cache"),
    ("ours", "ours+cache"),
)


def timing_batch(config, batch_size: int, device: torch.device) -> dict:
    """A fixed synthetic batch with what the loader gives: images, targets, index, random
    whole-pixel crop boxes of the 224 px originals (10-100% of the area) and flips."""
    generator = torch.Generator().manual_seed(0)
    size = config.data.image_size
    side = (torch.rand(batch_size, generator=generator) * 0.68 + 0.32) * size  # sqrt(0.1..1)
    side = side.floor().clamp(min=8)
    top = (torch.rand(batch_size, generator=generator) * (size - side)).floor()
    left = (torch.rand(batch_size, generator=generator) * (size - side)).floor()
    shape = (batch_size, config.data.in_chans, size, size)
    classes = config.data.num_classes
    return {
        "image": torch.rand(shape, generator=generator).to(device),
        "target": torch.randint(0, classes, (batch_size,), generator=generator).to(device),
        "index": torch.arange(batch_size),
        "crop": torch.stack([top, left, side, side], dim=1),
        "flip": torch.rand(batch_size, generator=generator) < 0.5,
    }


def batch_cache(config, teacher: DenseTeacher, batch: dict, device, workdir: Path) -> CachedTeacher:
    """The teacher's maps of the batch's images, taken as the whole originals, written to
    ``workdir`` as ``.npy`` files and memory-mapped, as a cache on disk is read in training."""
    with torch.no_grad():
        output = teacher(teacher.normalize(batch["image"]))
    size = config.data.image_size
    sizes = torch.full((len(batch["image"]), 2), size)
    cache = memory_cache(
        output.dense_logits.float().half(), sizes, train_grid=output.dense_logits.shape[-2:]
    )
    for shard in cache.shards:
        for key, array in shard.items():
            path = workdir / f"{key}.npy"
            np.save(path, array)
            shard[key] = np.load(path, mmap_mode="r")
    return CachedTeacher(cache, device=device)


def measure(
    name: str, *, ways: list[str], batch_size: int, device, repeats, steps, warmup, extra, workdir
):
    pair = PAIRS[name]
    trainers, states = {}, {}
    seed_everything(0)
    base = pair_config(pair, batch_size=batch_size, device=str(device), extra=extra)
    student = build_student(base).to(device)

    def new_teacher() -> DenseTeacher:
        model = timm.create_model(
            base.teacher.name,
            pretrained=False,
            num_classes=base.data.num_classes,
            in_chans=base.data.in_chans,
            **base.teacher.kwargs,
        )
        return DenseTeacher(
            model, name=base.teacher.name, mean=base.teacher.mean, std=base.teacher.std
        )

    teacher_state = new_teacher().model.state_dict()  # one set of weights for every way
    batch = timing_batch(base, batch_size, device)
    for way in ways:
        overrides, cached = WAYS[way]
        config = pair_config(
            pair, batch_size=batch_size, device=str(device), extra=[*overrides, *extra]
        )
        teacher = new_teacher()
        teacher.model.load_state_dict(teacher_state)
        teacher = place_teacher(config, teacher, device)
        trainer, _ = build_trainer(config, "cskd", student, teacher, device)
        if config.train.amp == "fp16":
            trainer.scaler = torch.amp.GradScaler(device.type)
        if cached:
            trainer.cached_teacher = batch_cache(config, teacher, batch, device, workdir)
        trainers[way], states[way] = trainer, TrainState()
    for way in ways:
        for _ in range(warmup):
            trainers[way].step(batch, states[way])
    synchronize(device)
    times: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(repeats):
        for way in ways:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                trainers[way].step(batch, states[way])
            synchronize(device)
            times[way].append((time.perf_counter() - start) / steps)
    return {
        "pair": name,
        "description": pair.description,
        "batch_size": batch_size,
        "seconds_per_step": times,
    }


def cache_build_cost(
    name: str, *, images: int, device, extra: list[str], workdir: Path
) -> list[dict]:
    """Build a real cache over ``images`` synthetic images with the pair's teacher (random
    weights): seconds and bytes per image, every logit in float16 and the top-10."""
    pair = PAIRS[name]
    config = pair_config(pair, batch_size=8, device=str(device), extra=extra)
    weights = workdir / "teacher.pth"
    model = timm.create_model(
        config.teacher.name,
        pretrained=False,
        num_classes=config.data.num_classes,
        **config.teacher.kwargs,
    )
    torch.save(model.state_dict(), weights)
    rows = []
    for topk in (0, min(10, config.data.num_classes - 1)):
        directory = workdir / f"cache_top{topk}"
        overrides = [
            *pair.overrides,
            *extra,
            "data.dataset=synthetic",
            f"data.synthetic_size={images}",
            "data.train_subset=0",
            "data.val_split=0",
            f"train.device={device}",
            "data.workers=0",
            "data.batch_size=8",
            f"teacher.checkpoint={weights}",
            f"teacher.cache={directory}",
            f"teacher.cache_topk={topk}",
        ]
        start = time.perf_counter()
        build_cache(load_config(ROOT / pair.recipe if pair.recipe else None, overrides))
        seconds = time.perf_counter() - start
        cache = open_cache(directory)
        stored = sum(p.stat().st_size for p in directory.glob("shard-*.npy"))
        per_image = stored / images
        rows.append(
            {
                "storage": "every logit, float16" if not topk else f"top-{topk}, float16 + int16",
                "payload_bytes_per_image": stored_payload(cache) / images,
                "images": images,
                "map_grid": cache.header["map_grid"],
                "seconds_per_image": seconds / images,
                "bytes_per_image": per_image,
                "imagenet_gb": stored_payload(cache) / images * IMAGENET_TRAIN_IMAGES / 1e9,
            }
        )
    return rows


def loading_rate(*, images: int, workdir: Path) -> dict:
    """Images per second one loader worker prepares with the ImageNet recipe's training transform
    (JPEG decode, RandomResizedCrop to 224, flip, RandAugment rand-m9-mstd0.5-inc1, ToTensor) on
    real photos (matplotlib's sample photograph at ImageNet's typical 500 x 375 and others), and
    the decode alone."""
    import matplotlib
    from PIL import Image

    from cskd.data import ImageFolderDataset, TrainTransform

    source = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with Image.open(source) as photo:
        photo = photo.convert("RGB")
    folder = workdir / "photos" / "train" / "class_0"
    folder.mkdir(parents=True)
    sizes = [(500, 375), (375, 500), (500, 333), (640, 480), (512, 600)]
    for number in range(images):
        width, height = sizes[number % len(sizes)]
        photo.resize((width, height)).rotate(3 * number).save(folder / f"{number}.jpg", quality=90)
    dataset = ImageFolderDataset(
        root=workdir / "photos", split="train", transform=TrainTransform(image_size=224)
    )
    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    full = len(dataset) / (time.perf_counter() - start)
    start = time.perf_counter()
    for path in dataset.paths:
        with Image.open(path) as image:
            image.convert("RGB")
    decode = len(dataset) / (time.perf_counter() - start)
    return {"images": images, "per_worker_images_per_s": full, "decode_images_per_s": decode}


def stored_payload(cache: TeacherCache) -> int:
    """Bytes of the arrays themselves (without the .npy headers), over every shard."""
    return sum(array.nbytes for shard in cache.shards for array in shard.values())


def summarise(result: dict) -> dict:
    times, batch = result["seconds_per_step"], result["batch_size"]
    rows = {
        way: {
            "images_per_s": batch / statistics.median(values),
            "min": batch / max(values),
            "max": batch / min(values),
        }
        for way, values in times.items()
    }
    ratios = {}
    for slow, fast in RATIOS:
        if slow in times and fast in times:
            per_rep = [s / f for s, f in zip(times[slow], times[fast], strict=True)]
            ratios[f"{slow} / {fast}"] = (statistics.median(per_rep), *quartiles(per_rep))
    return {"rows": rows, "ratios": ratios}


def report(results: list[dict], costs: list[dict], record: dict) -> str:
    """The Markdown block: images/s per way, the ratios, the cache's build cost, loading."""
    lines = [
        f"- Command: `{record['command']}`",
        f"- Machine: {record['machine']}",
        f"- {record['repeats']} interleaved repetitions of {record['steps']} steps per way; "
        "median images/s (min–max); step-time ratios: median of the per-repetition ratio (IQR)",
        "",
        "| pair | batch | way | images/s |",
        "|---|---|---|---|",
    ]
    for result in results:
        summary = summarise(result)
        for way, row in summary["rows"].items():
            lines.append(
                f"| {result['pair']} | {result['batch_size']} | {way} | "
                f"{row['images_per_s']:.2f} ({row['min']:.2f}–{row['max']:.2f}) |"
            )
    lines += ["", "| pair | step-time ratio | median (IQR) |", "|---|---|---|"]
    for result in results:
        for name, (median, low, high) in summarise(result)["ratios"].items():
            lines.append(
                f"| {result['pair']} | {name} | **{median:.2f}x** ({low:.2f}–{high:.2f}) |"
            )
    if costs:
        lines += [
            "",
            "Building the cache (`cskd cache`, the teacher over whole images, written to disk):",
            "",
            "| pair | storage | images | map | s / image | bytes / image (on disk) | ImageNet-1k |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in costs:
            lines.append(
                f"| {row['pair']} | {row['storage']} | {row['images']} | "
                f"{row['map_grid'][0]} x {row['map_grid'][1]} | {row['seconds_per_image']:.3f} | "
                f"{row['payload_bytes_per_image']:,.0f} ({row['bytes_per_image']:,.0f}) | "
                f"{row['imagenet_gb']:.1f} GB |"
            )
    loading = record.get("loading")
    if loading:
        lines += [
            "",
            f"Data loading (one loader worker, {loading['images']} real photos, the ImageNet "
            f"recipe's training transform at 224 px): **{loading['per_worker_images_per_s']:.0f} "
            f"images/s per worker**, of which JPEG decoding alone runs at "
            f"{loading['decode_images_per_s']:.0f} images/s. Workers needed to keep up:",
            "",
            "| pair | way | images/s | loader workers needed |",
            "|---|---|---|---|",
        ]
        for result in results:
            for way, row in summarise(result)["rows"].items():
                needed = math.ceil(row["images_per_s"] / loading["per_worker_images_per_s"])
                lines.append(f"| {result['pair']} | {way} | {row['images_per_s']:.0f} | {needed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pairs", nargs="+", default=["deit_ti_regnety_160"], choices=sorted(PAIRS)
    )
    parser.add_argument("--ways", nargs="+", default=["online", "cached"], choices=list(WAYS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=0, help="0: 8 on a CPU, 256 on a GPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--cache-images", type=int, default=32, help="0: skip the build cost")
    parser.add_argument("--loading-images", type=int, default=64, help="0: skip data loading")
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 repetitions")
    parser.add_argument("--results-dir", default="docs/results")
    parser.add_argument("--name", default="speed_path_cpu", help="JSON and report block name")
    parser.add_argument("overrides", nargs="*", help="config key=value for every way")
    arguments = parser.parse_args(argv)
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    device = torch.device(arguments.device)
    extra = list(arguments.overrides)
    pairs = arguments.pairs
    if arguments.quick:
        pairs, extra = ["fashion_mnist"], [*extra, *QUICK_OVERRIDES]
        arguments.repeats, arguments.warmup = 2, 1
        arguments.cache_images = min(arguments.cache_images, 16)
        arguments.loading_images = min(arguments.loading_images, 8)
    batch_size = arguments.batch_size or (8 if device.type == "cpu" else 256)
    results, costs = [], []
    for name in pairs:
        print(
            f"[speed_path] {name}: batch {batch_size} on {device}, ways {arguments.ways}",
            flush=True,
        )
        with tempfile.TemporaryDirectory() as workdir:  # the cached way's maps, on disk
            result = measure(
                name,
                ways=arguments.ways,
                batch_size=batch_size,
                device=device,
                repeats=arguments.repeats,
                steps=arguments.steps,
                warmup=arguments.warmup,
                extra=extra,
                workdir=Path(workdir),
            )
        results.append(result)
        print(f"[speed_path] {name}: {summarise(result)['ratios']}", flush=True)
        if arguments.cache_images:
            with tempfile.TemporaryDirectory() as workdir:
                for row in cache_build_cost(
                    name,
                    images=arguments.cache_images,
                    device=device,
                    extra=extra,
                    workdir=Path(workdir),
                ):
                    costs.append({"pair": name, **row})
    loading = None
    if arguments.loading_images:
        with tempfile.TemporaryDirectory() as workdir:
            loading = loading_rate(images=arguments.loading_images, workdir=Path(workdir))
    command = "python benchmarks/speed_path.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    record = {
        "command": command.strip(),
        "machine": machine(device),
        "repeats": arguments.repeats,
        "steps": arguments.steps,
        "results": results,
        "cache_build": costs,
        "loading": loading,
    }
    results_dir = Path(arguments.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{arguments.name}.json").write_text(json.dumps(record, indent=1))
    text = report(results, costs, record)
    write_report(results_dir / "speed_path.md", text + "\n", block_name=arguments.name)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
