"""Shared fixtures: a tiny teacher checkpoint and the overrides of a tiny synthetic run."""

from __future__ import annotations

import pytest
import timm
import torch

# Seconds after which a subprocess or a process group is taken to hang. A guard only: no test's
# verdict may depend on the machine's speed, so this is far beyond any run's time on a loaded
# 2-core machine (a test that waits for something holds it there until the test releases it).
HANG = 900

TINY_TEACHER = {"channels": [8, 16, 32, 64], "output_stride": 8}
TINY_STUDENT = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory) -> str:
    """A randomly initialised 4-class tiny ResNet-18 teacher (4 x 4 map at 32 px), as a state dict."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=4, **TINY_TEACHER)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def tiny_overrides(output_dir, teacher_checkpoint: str, **extra) -> list[str]:
    """``key=value`` overrides for a seconds-long CSKD run on synthetic 32 px images."""
    values = {
        "data.dataset": "synthetic",
        "data.num_classes": 4,
        "data.image_size": 32,
        "data.synthetic_size": 32,
        "data.batch_size": 8,
        "data.workers": 0,
        "data.eval_crop_pct": 1.0,
        "student.kwargs": str(TINY_STUDENT).replace("'", ""),
        "teacher.name": "resnet18",
        "teacher.checkpoint": teacher_checkpoint,
        "teacher.kwargs": str(TINY_TEACHER).replace("'", ""),
        "augment.randaugment": "",
        "optim.epochs": 2,
        "optim.warmup_epochs": 1,
        "optim.min_lr": 1e-6,  # below the peak, 5e-4 x 8 / 512 = 7.8e-6
        "train.output_dir": str(output_dir),
        "train.log_interval": 2,
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


@pytest.fixture
def tiny_run(tmp_path, teacher_checkpoint):
    """Factory: ``tiny_run(**overrides) -> list of key=value`` writing into tmp_path/run."""
    return lambda **extra: tiny_overrides(tmp_path / "run", teacher_checkpoint, **extra)
