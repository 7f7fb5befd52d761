"""Identical outputs before and after a refactor: digests of what four short runs write.

Runs, through the ``cskd`` command (so that the check does not depend on the package's inner
layout), at one torch thread and a fixed seed, on the Fashion-MNIST miniature:

1. the teacher (``configs/fashion_mnist/teacher.yaml``, method ``none``);
2. a ``deit`` student and 3. a ``cskd`` student of that teacher, with Mixup/CutMix, RandAugment,
   random erasing, EMA, the official test split and the diagnostics on, so every path of a step
   and of an epoch's evaluation runs;
4. ``cskd cache`` of the teacher, then a ``cskd`` student trained from that cache;

then ``cskd eval`` of the cached student's ``last.pt``. Each run is a few dozen steps. Recorded
per run: the SHA-256 of ``metrics.jsonl`` with its two timing fields (``images_per_s``,
``epoch_time_s``) removed, of ``final_metrics.json``, of ``config.yaml``, and of the exported
weights' tensors; the cache's shard files; the evaluation's JSON.

    python benchmarks/identical_outputs.py --write   # record docs/results/identical_outputs.json
    python benchmarks/identical_outputs.py           # compare with it: exit 1 naming what differs

A change that is meant to alter the logs in one known way is checked against the old source with
the changed metric left out of both sides (``PYTHONPATH`` picks the source the runs import)::

    PYTHONPATH=<old checkout>/src python benchmarks/identical_outputs.py --write \
        --ignore-metric local_weight --results /tmp/old.json
    python benchmarks/identical_outputs.py --ignore-metric local_weight --results /tmp/old.json

The work directory is fixed (``--work-dir``, default /tmp/cskd_identical_outputs), because
``config.yaml`` holds the run's paths. About two minutes on one core.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "identical_outputs.json"
TIMING_KEYS = ("images_per_s", "epoch_time_s")
IGNORED: list[str] = []  # metrics left out of the digests (--ignore-metric)
DATA = [
    "data.train_subset=1000",
    "data.val_split=200",
    "data.workers=0",
    "data.batch_size=32",
    "data.eval_batch_size=100",
    "optim.epochs=2",
    "optim.warmup_epochs=1",
    "train.max_steps_per_epoch=12",
    "train.eval_max_batches=2",
    "train.eval_test=true",
    "train.seed=3",
]
TINY_TEACHER = "{channels: [8, 16, 32, 64], output_stride: 8}"
STUDENT = [
    f"teacher.kwargs={TINY_TEACHER}",
    "student.kwargs={img_size: 32, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}",
    "augment.mixup=0.8",
    "augment.cutmix=1.0",
    "augment.randaugment=rand-m9-mstd0.5-inc1",
    "augment.reprob=0.25",
    "train.ema=true",
    "train.diagnostics=true",
    "train.diagnostics_images=64",
]


def cskd(*arguments: str) -> str:
    """Run ``python -m cskd ...`` at one thread; its stdout (stops the check on failure)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "cskd", *arguments],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"cskd {' '.join(arguments)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def without_timing(value):
    """A metrics record without the timing fields (and the ``--ignore-metric`` keys)."""
    if isinstance(value, dict):
        dropped = (*TIMING_KEYS, *IGNORED)
        return {k: without_timing(v) for k, v in value.items() if k not in dropped}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def run_digests(run_dir: Path) -> dict:
    """Digests of what a run wrote (timing fields removed from its metrics)."""
    import torch
    from safetensors.torch import load_file

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    metrics = "\n".join(json.dumps(without_timing(json.loads(line))) for line in lines)
    tensors = load_file(str(run_dir / "student.safetensors"))
    weights = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        weights.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        weights.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return {
        "metrics.jsonl": digest(metrics.encode()),
        "metrics_records": len(lines),
        "final_metrics.json": digest((run_dir / "final_metrics.json").read_bytes()),
        "config.yaml": digest((run_dir / "config.yaml").read_bytes()),
        "student.safetensors tensors": weights.hexdigest(),
    }


def flatten(outputs: dict) -> dict:
    """``{"run: key": value}`` for every recorded value."""
    flat = {}
    for run, values in outputs.items():
        for key, value in values.items() if isinstance(values, dict) else [("", values)]:
            flat[f"{run}: {key}"] = value
    return flat


def measure(work: Path) -> dict:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    recipes = ROOT / "configs" / "fashion_mnist"
    teacher_dir = work / "teacher"
    cskd(
        "train",
        "--config",
        str(recipes / "teacher.yaml"),
        *DATA,
        f"student.kwargs={TINY_TEACHER}",
        f"train.output_dir={teacher_dir}",
    )
    student = [*DATA, *STUDENT, f"teacher.checkpoint={teacher_dir / 'student.safetensors'}"]
    results = {"teacher": run_digests(teacher_dir)}
    for method in ("deit", "cskd"):
        run_dir = work / method
        cskd(
            "train",
            "--config",
            str(recipes / "cskd.yaml"),
            *student,
            f"distill.method={method}",
            f"train.output_dir={run_dir}",
        )
        results[method] = run_digests(run_dir)
    cache = work / "cache"
    cskd("cache", "--config", str(recipes / "cskd.yaml"), *student, f"teacher.cache={cache}")
    results["cache shards"] = {
        path.name: digest(path.read_bytes()) for path in sorted(cache.glob("*.npy"))
    }
    cached = work / "cskd_cached"
    cskd(
        "train",
        "--config",
        str(recipes / "cskd.yaml"),
        *student,
        f"teacher.cache={cache}",
        f"train.output_dir={cached}",
    )
    results["cskd cached"] = run_digests(cached)
    evaluation = cskd("eval", "--checkpoint", str(cached / "last.pt"))
    results["cskd eval"] = digest(json.dumps(json.loads(evaluation), sort_keys=True).encode())
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="record instead of comparing")
    parser.add_argument("--work-dir", default="/tmp/cskd_identical_outputs")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument(
        "--ignore-metric",
        action="append",
        default=[],
        help="leave this metrics.jsonl key out of the digests (a change meant to alter it)",
    )
    arguments = parser.parse_args(argv)
    IGNORED[:] = arguments.ignore_metric
    measured = measure(Path(arguments.work_dir))
    results = Path(arguments.results)
    if arguments.write:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        record = {
            "command": "python benchmarks/identical_outputs.py --write",
            "recorded_at_commit": head,
            "outputs": measured,
        }
        results.write_text(json.dumps(record, indent=1) + "\n")
        print(f"recorded {results}")
        return 0
    expected = flatten(json.loads(results.read_text())["outputs"])
    found = flatten(measured)
    differences = sorted(
        key for key in expected.keys() | found.keys() if expected.get(key) != found.get(key)
    )
    if differences:
        print(f"outputs differ from {results}:\n  " + "\n  ".join(differences))
        return 1
    print(f"identical: all {len(found)} digests match {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
