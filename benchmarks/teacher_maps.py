"""How local is the Fashion-MNIST teacher's dense map? Evidence for reading the CSKD results.

CSKD's extra signal is the difference between the teacher's per-location answers (P_local) and
its global answer (P_global). If every location of the 4 x 4 map already gives the global class,
the dense loss adds little beyond DeiT's token loss. This script runs the benchmark's teacher over
the test images and reports, per location and overall: the top-1 of argmax P_local, how often it
agrees with argmax P_global, and the entropy of softmax(P_local) vs softmax(P_global).

    python benchmarks/teacher_maps.py --checkpoint runs/benchmarks/fashion_mnist/teacher/student.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from cskd.config import load_config
from cskd.data import build_datasets
from cskd.data.sampling import eval_loader
from cskd.training.models import load_teacher

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def teacher_map_statistics(checkpoint: str, *, max_images: int = 0) -> dict:
    config = load_config(
        ROOT / "configs/fashion_mnist/cskd.yaml", [f"teacher.checkpoint={checkpoint}"]
    )
    teacher = load_teacher(
        config.teacher.name,
        checkpoint,
        num_classes=config.data.num_classes,
        mean=config.teacher.mean,
        std=config.teacher.std,
        **{"in_chans": config.data.in_chans, **config.teacher.kwargs},
    )
    _, test_set = build_datasets(config.data, config.augment)
    loader = eval_loader(
        test_set, batch_size=500, workers=0, rank=0, world_size=1, pin_memory=False
    )
    totals: dict[str, torch.Tensor | float] = {}
    count = 0
    for batch in loader:
        images = teacher.normalize(batch["image"])
        targets = batch["target"]  # (N,)
        output = teacher(images)
        dense, global_logits = output.dense_logits, output.global_logits  # (N, K, H, W), (N, K)
        local_class = dense.argmax(dim=1)  # (N, H, W)
        global_class = global_logits.argmax(dim=1)  # (N,)
        local_entropy = -(dense.softmax(1) * dense.log_softmax(1)).sum(1)  # (N, H, W)
        global_entropy = -(global_logits.softmax(1) * global_logits.log_softmax(1)).sum(1)
        parts = {
            "local_top1": (local_class == targets[:, None, None]).float().sum(0),
            "local_agrees_with_global": (local_class == global_class[:, None, None]).float().sum(0),
            "local_entropy": local_entropy.sum(0),
            "global_top1": (global_class == targets).float().sum(),
            "global_entropy": global_entropy.sum(),
            "images_all_locations_agree": (local_class == global_class[:, None, None])
            .flatten(1)
            .all(1)
            .float()
            .sum(),
        }
        for key, value in parts.items():
            totals[key] = totals.get(key, 0.0) + value
        count += targets.shape[0]
        if max_images and count >= max_images:
            break
    result = {"images": count, "grid": list(totals["local_top1"].shape)}
    for key, value in totals.items():
        value = value / count
        scale = 1.0 if "entropy" in key else 100.0
        result[key] = (value * scale).tolist() if value.dim() else float(value) * scale
        if value.dim():
            result[f"{key}_mean"] = float(value.mean()) * scale
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", default="runs/benchmarks/fashion_mnist/teacher/student.safetensors"
    )
    parser.add_argument("--output", default="docs/results/fashion_mnist_teacher_maps.json")
    parser.add_argument("--max-images", type=int, default=0, help="0 = the whole test set")
    arguments = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = teacher_map_statistics(arguments.checkpoint, max_images=arguments.max_images)
    Path(arguments.output).write_text(json.dumps(result, indent=1))
    for key in ("global_top1", "local_top1_mean", "local_agrees_with_global_mean"):
        print(f"{key}: {result[key]:.2f}%")
    print(
        f"images whose every location agrees with the global class: {result['images_all_locations_agree']:.2f}%"
    )
    print(
        f"entropy: local {result['local_entropy_mean']:.3f}, global {result['global_entropy']:.3f} nats"
    )
    print(
        "local top-1 per location:\n"
        + "\n".join(" ".join(f"{v:5.1f}" for v in row) for row in result["local_top1"])
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
