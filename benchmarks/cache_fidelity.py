"""What the teacher cache costs in fidelity: its targets against the online teacher's on the same
augmented batches, and CSKD's accuracy trained from it against the online runs.

On the regime study's ``long`` setting (Fashion-MNIST, 10,000 training images, 32 px, the
narrow ResNet-18 teacher trained 30 epochs, DeiT with an 8 x 8 grid, 4 x 4 teacher map; see
``benchmarks/regimes.py``):

1. The teacher: the ``long`` regime's own, trained again here when its weights are gone (CPU
   training is deterministic) and its weights' SHA-256 compared with the one the regime study
   recorded, so the online runs of ``docs/results/regime_long.json`` distilled from this very
   teacher.
2. Caches at ``teacher.cache_size`` 32 and 64 px (``cskd cache``), their build time and size.
3. Fidelity, per augmentation setting: on the same training batches (the run's sampler, epoch 0,
   seed 0), the fraction of locations where the cached hard CKF target (argmax over classes of
   a P_local + (1 - a) P_global) equals the online one at a = 1, 0.5 and 0, and where the global
   (DeiT token) targets agree. Settings: the recipe's (crop of 75-100% of the area, flip), DeiT's
   crop (8-100%), and DeiT's crop with RandAugment, with random erasing, with Mixup/CutMix, and
   with all three (the ImageNet recipe's augmentation).
4. Accuracy: ``cskd/linear`` trained from the cache with the higher-fidelity size, three seeds,
   against the regime study's online ``cskd/linear`` runs of the same seeds (same initialisation,
   data order and augmentation): paired test top-1 differences.

    python benchmarks/cache_fidelity.py --threads 1                # about 1 core-hour
    python benchmarks/cache_fidelity.py --report-only
    python benchmarks/cache_fidelity.py --quick --output-dir /tmp/c --results-dir /tmp/c
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model  # noqa: E402
from fashion_mnist import read_results, write_results  # noqa: E402
from regimes import (  # noqa: E402
    METHODS,
    RECIPES,
    REGIMES,
    describe_difference,
    run_key,
    run_one,
)

from cskd.commands.cache import build_cache
from cskd.config import load_config
from cskd.data import build_datasets
from cskd.data.sampling import EpochSampler, train_loader
from cskd.method.distiller import normalizer
from cskd.method.losses import fused_target
from cskd.teacher.cached import CachedTeacher, mix_with_partner_weights
from cskd.teacher.store import open_cache
from cskd.training.build import build_batch_augmentation, seed_everything
from cskd.training.models import build_teacher

CACHES = {  # label -> (teacher.cache_size, teacher.cache_topk)
    "32 px": (32, 0),
    "64 px": (64, 0),
    "32 px, top-3": (32, 3),  # the storage ImageNet needs (top-k of 1000), here k of 10
}
WEIGHTS = (1.0, 0.5, 0.0)
DEIT_CROP = "augment.scale=[0.08, 1.0]"
RANDAUGMENT = "augment.randaugment=rand-m9-mstd0.5-inc1"
ERASING = "augment.reprob=0.25"
MIXING = ("augment.mixup=0.8", "augment.cutmix=1.0")
SETTINGS = {  # name -> augmentation overrides on top of the regime's recipe
    "recipe: crop 75-100%, flip": (),
    "DeiT crop 8-100%, flip": (DEIT_CROP,),
    "DeiT crop + RandAugment": (DEIT_CROP, RANDAUGMENT),
    "DeiT crop + erasing 0.25": (DEIT_CROP, ERASING),
    "DeiT crop + Mixup/CutMix": (DEIT_CROP, *MIXING),
    "DeiT crop + all three (ImageNet recipe)": (DEIT_CROP, RANDAUGMENT, ERASING, *MIXING),
}
GENERATED_START = "<!-- generated:start (benchmarks/cache_fidelity.py rewrites this block) -->"
GENERATED_END = "<!-- generated:end -->"


@torch.no_grad()
def agreement(config, cache_path: Path, *, batches: int) -> dict:
    """Fractions of locations (and of images, for the global target) where the cached targets
    equal the online teacher's, over ``batches`` training batches of epoch 0."""
    seed_everything(config.train.seed)
    device = torch.device("cpu")
    train_set, _ = build_datasets(config.data, config.augment)
    teacher = build_teacher(config, method="cskd")
    cached = CachedTeacher(open_cache(cache_path))
    erasing, mixup = build_batch_augmentation(config, device)
    student_mean, student_std = normalizer(config.data.mean, config.data.std, device)
    sampler = EpochSampler(train_set, seed=config.train.seed, rank=0, world_size=1)
    sampler.set_epoch(0)
    loader = train_loader(
        train_set, sampler, batch_size=config.data.batch_size, workers=0, pin_memory=False
    )
    same = {a: 0 for a in WEIGHTS}
    same_global, cells, images_seen = 0, 0, 0
    for batch in itertools.islice(loader, batches):
        images = (batch["image"] - student_mean) / student_std  # as Trainer.prepare
        if erasing is not None:
            images = erasing(images)
        partner = None
        if mixup is not None:
            images, _, partner = mix_with_partner_weights(mixup, images, batch["target"])
        pixels = images * student_std + student_mean  # the batch as the teacher sees it
        online = teacher(teacher.normalize(pixels))
        offline = cached(
            index=batch["index"], crop=batch["crop"], flip=batch["flip"], partner=partner
        )
        for weight in WEIGHTS:
            a = fused_target(online.dense_logits, online.global_logits, weight).argmax(1)
            b = fused_target(offline.dense_logits, offline.global_logits, weight).argmax(1)
            same[weight] += int((a == b).sum())
        same_global += int(
            (online.global_logits.argmax(1) == offline.global_logits.argmax(1)).sum()
        )
        cells += online.dense_logits[:, 0].numel()
        images_seen += len(images)
    return {
        "locations": cells,
        "images": images_seen,
        **{f"hard_ckf_a{weight:g}": same[weight] / cells for weight in WEIGHTS},
        "global": same_global / images_seen,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two steps per run: a smoke test")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=20, help="training batches per setting")
    parser.add_argument("--output-dir", default="runs/benchmarks/cache")
    parser.add_argument("--results-dir", default="docs/results")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--threads", type=int, default=0)
    arguments = parser.parse_args(argv)
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    quick = arguments.quick
    regime = REGIMES["long"]
    name = "cache" + ("_quick" if quick else "")
    results_dir, output_dir = Path(arguments.results_dir), Path(arguments.output_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    results_path = results_dir / f"{name}.json"
    online_path = results_dir / ("regime_long_quick.json" if quick else "regime_long.json")

    if not arguments.report_only:
        results_before = read_results(results_path)["runs"]  # a rerun keeps the first choice
        teacher_dir = output_dir / "teacher"
        run_one(
            recipe=RECIPES / "teacher.yaml",
            overrides=regime.teacher_overrides(quick=quick),
            run_dir=teacher_dir,
            key="teacher",
            path=results_path,
            keeps=teacher_dir / "student.safetensors",
        )
        student = [
            *regime.student_overrides(quick=quick),
            *METHODS["cskd/linear"][0],
            f"teacher.checkpoint={teacher_dir / 'student.safetensors'}",
        ]
        caches = {}
        for label, (size, topk) in CACHES.items():
            path = output_dir / f"cache_{size}px_top{topk}"
            overrides = [
                *student,
                f"teacher.cache={path}",
                f"teacher.cache_size={size}",
                f"teacher.cache_topk={topk}",
            ]
            start = time.perf_counter()
            build_cache(load_config(RECIPES / "cskd.yaml", overrides))
            header = open_cache(path).header
            stored = sum(p.stat().st_size for p in path.glob("shard-*.npy"))
            caches[label] = {
                "path": str(path),
                "build_s": time.perf_counter() - start,
                "bytes": stored,
                "images": header["images"],
                "map_grid": header["map_grid"],
                "topk": topk,
            }
        fidelity = {}
        for setting, augment in SETTINGS.items():
            for label, cache in caches.items():
                config = load_config(RECIPES / "cskd.yaml", [*student, *augment])
                result = agreement(config, Path(cache["path"]), batches=arguments.batches)
                fidelity[f"{setting} | {label}"] = result
                print(f"[cache] {setting}, {label}: {result}", flush=True)
        recipe_setting = next(iter(SETTINGS))
        earlier = results_before.get("chosen_cache_size")  # how a first version recorded it
        chosen = (
            results_before.get("chosen_cache")
            or (earlier and f"{earlier} px")
            or max(
                (label for label, cache in caches.items() if not cache["topk"]),
                key=lambda label: fidelity[f"{recipe_setting} | {label}"]["hard_ckf_a1"],
            )
        )
        write_results(
            results_path,
            {"runs": {"caches": caches, "fidelity": fidelity, "chosen_cache": chosen}},
        )
        for seed in range(1 if quick else arguments.seeds):
            key = "cached-" + run_key("cskd/linear", seed)
            run_one(
                recipe=RECIPES / "cskd.yaml",
                overrides=[
                    *student,
                    f"teacher.cache={caches[chosen]['path']}",
                    f"train.seed={seed}",
                ],
                run_dir=output_dir / key,
                key=key,
                path=results_path,
            )
    results = read_results(results_path)["runs"]
    online = read_results(online_path)["runs"]
    command = "python benchmarks/cache_fidelity.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    block = report(results, online, command=command.strip(), quick=quick)
    write_block(results_dir / f"{name}.md", block)
    print(block, flush=True)
    return 0


def report(results: dict, online: dict, *, command: str, quick: bool) -> str:
    lines = [
        GENERATED_START,
        "",
        f"- Command: `{command}`" + (" (quick mode: a smoke test, not a result)" if quick else ""),
        f"- Machine: CPU ({cpu_model()}), torch {torch.__version__}, shared with other jobs",
    ]
    teacher, reference = results.get("teacher"), online.get("teacher")
    if teacher:
        same = reference and reference.get("weights_sha256") == teacher["weights_sha256"]
        lines.append(
            f"- Teacher: test top-1 {teacher['test']['cls']['top1']:.2f}%, weights SHA-256 "
            f"`{teacher['weights_sha256'][:16]}`: "
            + (
                "**the same as the regime study's teacher**"
                if same
                else "differs from the regime study's teacher (the online runs are not paired)"
            )
        )
    caches = results.get("caches", {})
    if caches:
        lines += [
            "",
            "| cache | teacher map | images | build time | stored |",
            "|---|---|---|---|---|",
        ]
        for label, cache in caches.items():
            lines.append(
                f"| {label} | {cache['map_grid'][0]} x {cache['map_grid'][1]} | "
                f"{cache['images']} | {cache['build_s']:.1f} s | "
                f"{cache['bytes'] / 1e6:.2f} MB ({cache['bytes'] / cache['images']:.0f} B/image) |"
            )
    fidelity = results.get("fidelity", {})
    if fidelity:
        lines += [
            "",
            "Agreement of the cached targets with the online teacher's on the same training "
            "batches (percent of locations; of images for the global target):",
            "",
            "| augmentation | cache | hard CKF a = 1 | a = 0.5 | a = 0 | global (DeiT token) |",
            "|---|---|---|---|---|---|",
        ]
        for key, row in fidelity.items():
            setting, label = key.split(" | ")
            lines.append(
                f"| {setting} | {label} | {100 * row['hard_ckf_a1']:.1f} | "
                f"{100 * row['hard_ckf_a0.5']:.1f} | {100 * row['hard_ckf_a0']:.1f} | "
                f"{100 * row['global']:.1f} |"
            )
        lines.append("")
        lines.append(
            f"Chosen for training: {results.get('chosen_cache', results.get('chosen_cache_size'))}"
            " (of the caches with every logit, the higher agreement at a = 1 with the recipe's "
            "augmentation)."
        )
    runs = {k: v for k, v in results.items() if k.startswith("cached-")}
    if runs:
        lines += [
            "",
            "Test top-1 at the last epoch, `cskd/linear` (cls+dist+patch), per seed:",
            "",
            "| seed | online (regime_long.json) | cached | cached - online |",
            "|---|---|---|---|",
        ]
        differences = []
        for key, entry in sorted(runs.items()):
            seed = int(key.rsplit("seed", 1)[1])
            cached_top1 = entry["test"]["cls+dist+patch"]["top1"]
            reference_run = online.get(run_key("cskd/linear", seed))
            if reference_run is None:
                lines.append(f"| {seed} | — | {cached_top1:.2f} | — |")
                continue
            online_top1 = reference_run["test"]["cls+dist+patch"]["top1"]
            differences.append(cached_top1 - online_top1)
            lines.append(
                f"| {seed} | {online_top1:.2f} | {cached_top1:.2f} | {differences[-1]:+.2f} |"
            )
        lines += [
            "",
            "| difference | n | per seed | mean ± std | verdict |",
            "|---|---|---|---|---|",
            describe_difference("cached - online (cls+dist+patch)", differences),
        ]
        spent = sum(entry.get("train_s", 0.0) for entry in runs.values())
        online_spent = sum(
            online[run_key("cskd/linear", int(k.rsplit("seed", 1)[1]))].get("train_s", 0.0)
            for k in runs
            if run_key("cskd/linear", int(k.rsplit("seed", 1)[1])) in online
        )
        lines.append("")
        lines.append(
            f"Training time (sum of epoch times, shared cores): cached {spent / 60:.1f} min, "
            f"the online runs {online_spent / 60:.1f} min (recorded by the regime study, on other "
            "days' loads: not a speed measurement; see speed_path.md)."
        )
    lines += ["", GENERATED_END]
    return "\n".join(lines)


def write_block(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else "# Teacher cache: fidelity and accuracy\n\n"
    if GENERATED_START in text and GENERATED_END in text:
        before, rest = text.split(GENERATED_START, 1)
        text = before + block + rest.split(GENERATED_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
