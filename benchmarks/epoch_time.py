"""Fashion-MNIST CSKD epoch time before and after removing non-model work, side by side.

Profiling one epoch of ``configs/fashion_mnist/cskd.yaml`` (``data.workers=0``, one thread)
showed that seeding each sample with ``torch.manual_seed`` cost about as much as the sample's
transform: on a CUDA build of PyTorch without an initialised GPU, ``torch.manual_seed`` also
queues a CUDA seeding call and records a Python traceback for it. The sampler now seeds only the
CPU generator (identical draws: the transforms use no other). The regime study also evaluates
every third epoch (``train.eval_interval=3``) instead of every epoch.

This script trains one epoch (plus its evaluation on the 10,000 test images) with the old
seeding and with the new, interleaved, ``--repeats`` times, and reports the medians: the
training part (data + steps), the evaluation, and the epoch time amortised over evaluation
every epoch (before) and every third epoch (after).

    python benchmarks/epoch_time.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from common import cpu_model

from cskd.config import load_config
from cskd.data import sampling
from cskd.training.run import train

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def legacy_seeding():
    """The sampler as it was: ``torch.manual_seed`` (CPU and CUDA) for every sample."""
    original = sampling.SeededSamples.__getitem__

    def getitem(self, key):
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)

    sampling.SeededSamples.__getitem__ = getitem
    try:
        yield
    finally:
        sampling.SeededSamples.__getitem__ = original


def one_epoch(teacher: str, steps: int, eval_batches: int) -> dict:
    """Wall time of one CSKD epoch: its training part and its evaluation."""
    with tempfile.TemporaryDirectory() as folder:
        overrides = [
            "optim.epochs=1",
            "optim.warmup_epochs=0",
            "data.workers=0",
            f"teacher.checkpoint={teacher}",
            f"train.output_dir={folder}/run",
            "train.log_interval=1000",
        ]
        if steps:
            overrides += [f"train.max_steps_per_epoch={steps}"]
        if eval_batches:
            overrides += [f"train.eval_max_batches={eval_batches}"]
        start = time.perf_counter()
        train(load_config(ROOT / "configs/fashion_mnist/cskd.yaml", overrides))
        total = time.perf_counter() - start
        record = [
            json.loads(line)
            for line in (Path(folder) / "run" / "metrics.jsonl").read_text().splitlines()
            if '"type": "epoch"' in line
        ][0]
    training = record["train"]["epoch_time_s"]
    return {"train_s": training, "rest_s": total - training}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="runs/fashion_mnist/teacher/student.safetensors")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0, help="steps per epoch (0 = all 78)")
    parser.add_argument("--eval-batches", type=int, default=0, help="0 = all test images")
    parser.add_argument("--output", default=str(ROOT / "docs/results/epoch_time"))
    arguments = parser.parse_args(argv)
    torch.set_num_threads(1)
    times: dict[str, list[dict]] = {"before": [], "after": []}
    settings = (arguments.teacher, arguments.steps, arguments.eval_batches)
    for _ in range(arguments.repeats):
        with legacy_seeding():
            times["before"].append(one_epoch(*settings))
        times["after"].append(one_epoch(*settings))
    median = {
        name: {key: statistics.median(run[key] for run in runs) for key in ("train_s", "rest_s")}
        for name, runs in times.items()
    }
    before = median["before"]["train_s"] + median["before"]["rest_s"]
    after = median["after"]["train_s"] + median["after"]["rest_s"] / 3
    command = "python benchmarks/epoch_time.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Fashion-MNIST CSKD epoch time: before and after removing non-model work",
        "",
        f"Produced by `{command.strip()}` on {cpu_model()} (1 thread, `data.workers=0`, the",
        "machine shared with other jobs), medians of interleaved repetitions. `train` is the",
        "epoch's training part (loading, augmentation, steps); `evaluation and set-up` the rest of",
        "a one-epoch run (evaluation on the 10,000 test images, building the run).",
        "",
        "| | train (s) | evaluation and set-up (s) | epoch, evaluated every epoch (s) | epoch, evaluated every 3rd (s) |",
        "|---|---|---|---|---|",
    ]
    for name in ("before", "after"):
        train_s, rest_s = median[name]["train_s"], median[name]["rest_s"]
        lines.append(
            f"| {name} seeding | {train_s:.1f} | {rest_s:.1f} | {train_s + rest_s:.1f} | "
            f"{train_s + rest_s / 3:.1f} |"
        )
    lines += [
        "",
        f"Before (old seeding, evaluation every epoch) {before:.1f} s; after (new seeding, "
        f"evaluation every third epoch, as the regime study runs) {after:.1f} s: "
        f"{before / after:.2f}x.",
        "",
        "Per repetition: " + json.dumps(times),
        "",
    ]
    Path(arguments.output + ".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
