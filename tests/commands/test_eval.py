"""``cskd eval`` scores the model's classes, never another label set by position."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from cskd.cli import main

ROOT = Path(__file__).resolve().parents[2]
TRAINED = ["class_0", "class_1", "class_2", "class_3"]  # the synthetic data's classes


def _folder(root: Path, classes: list[str]) -> Path:
    """``root/val/<class>/<i>.png``: three random 32 px RGB images per class."""
    generator = torch.Generator().manual_seed(0)
    for name in classes:
        (root / "val" / name).mkdir(parents=True)
        for i in range(3):
            pixels = (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8)
            Image.fromarray(pixels.numpy(), mode="RGB").save(root / "val" / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, teacher_checkpoint):
    from conftest import tiny_overrides

    run = tmp_path_factory.mktemp("eval") / "run"
    overrides = tiny_overrides(run, teacher_checkpoint, **{"optim.epochs": 1})
    assert main(["train", *overrides, "optim.warmup_epochs=0"]) == 0
    return run


def _eval(checkpoint: Path, folder: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cskd", "eval", "--checkpoint", str(checkpoint), *extra]
    command += ["data.dataset=folder", f"data.root={folder}", "data.workers=0"]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("saved", ["last.pt", "student.safetensors"])
@pytest.mark.parametrize(
    ("classes", "named"),
    [
        (["class_0", "class_1", "class_2", "shirt"], "class_3"),  # one renamed
        (["class_0", "class_1", "class_2", "class_9"], "class_9"),  # one missing, one extra
        (["class_0", "class_1", "class_2"], "class_3"),  # one missing
        (["class_0", "class_1", "class_2", "class_3", "class_4"], "class_4"),  # one extra
    ],
)
def test_eval_on_another_label_set_is_refused_in_one_line(trained, tmp_path, saved, classes, named):
    result = _eval(trained / saved, _folder(tmp_path / "data", classes))
    lines = [line for line in result.stderr.splitlines() if line.startswith("cskd ")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and named in lines[0] and "--classes-by-name" in lines[0], lines
    assert result.stdout == ""


def test_eval_on_the_model_classes_scores_and_a_subset_is_scored_by_name(trained, tmp_path):
    same = _eval(trained / "student.safetensors", _folder(tmp_path / "same", TRAINED))
    assert same.returncode == 0, same.stderr[-2000:]
    assert json.loads(same.stdout)["images"] == 12
    # three of the four classes, explicitly matched by name: each image keeps its own class
    subset = _folder(tmp_path / "subset", ["class_1", "class_2", "class_3"])
    by_name = _eval(trained / "last.pt", subset, "--classes-by-name")
    assert by_name.returncode == 0, by_name.stderr[-2000:]
    metrics = json.loads(by_name.stdout)
    assert metrics["images"] == 9
    assert metrics["classes"] == {"matched_by_name": ["class_1", "class_2", "class_3"], "of": 4}
    assert "matched by name" in by_name.stderr
    # a data class the model does not know cannot be matched
    other = _folder(tmp_path / "other", ["class_1", "sandal"])
    refused = _eval(trained / "last.pt", other, "--classes-by-name")
    assert refused.returncode == 2 and "sandal" in refused.stderr.splitlines()[-1]


def test_a_checkpoint_records_the_class_names(trained):
    from cskd.training.state import read_checkpoint

    assert read_checkpoint(trained / "last.pt")["class_names"] == TRAINED


def test_classes_matched_by_name_take_the_model_labels(tmp_path):
    from cskd.commands.eval import ClassesByName
    from cskd.data.folder import ImageFolderDataset

    folder = _folder(tmp_path, ["class_3", "class_1"])  # data labels 0, 1 (sorted names)
    data = ImageFolderDataset(root=str(folder), split="val", transform=None)
    assert data.classes == ["class_1", "class_3"]
    matched = ClassesByName(data, TRAINED)
    assert [matched[i]["target"] for i in range(len(matched))] == [1, 1, 1, 3, 3, 3]


def test_folder_names_match_class_names_that_cannot_be_folder_names(tmp_path):
    """Fashion-MNIST's "T-shirt/top" cannot name a folder: by name, "T-shirt_top" (or any
    spelling that differs only in case and punctuation) is that class."""
    from cskd.commands.eval import ClassesByName, class_key
    from cskd.data.folder import ImageFolderDataset

    assert class_key("T-shirt/top") == class_key("t-shirt_top") == class_key("T-shirt top")
    assert class_key("Sandal") != class_key("Sneaker")
    model = ["T-shirt/top", "Trouser", "Pullover"]
    folder = _folder(tmp_path, ["T-shirt_top", "pullover"])
    data = ImageFolderDataset(root=str(folder), split="val", transform=None)
    assert data.classes == ["T-shirt_top", "pullover"]
    matched = ClassesByName(data, model)
    assert [matched[i]["target"] for i in range(len(matched))] == [0, 0, 0, 2, 2, 2]
    # names that only a key would tell apart are matched exactly
    assert ClassesByName(data, ["pullover", "T-shirt_top", "Pull-over"]).mapping == [1, 0]


def test_eval_scores_the_whole_split_whatever_cap_the_run_trained_with(
    tmp_path, teacher_checkpoint
):
    """A run that evaluated 1 batch per epoch (train.eval_max_batches=1): cskd eval scores
    every image unless the command itself caps it, and then its log says so."""
    from conftest import tiny_overrides

    run = tmp_path / "run"
    capped = {"optim.epochs": 1, "train.eval_max_batches": 1, "data.eval_batch_size": 4}
    assert main(["train", *tiny_overrides(run, teacher_checkpoint, **capped)]) == 0
    command = [sys.executable, "-m", "cskd", "eval", "--checkpoint", str(run / "last.pt")]
    whole = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert whole.returncode == 0, whole.stderr[-2000:]
    images = json.loads(whole.stdout)["images"]
    assert images > 4 and f"on {images} images" in whole.stderr
    # the run's own epoch line said its score was of a part of the split
    lines = (run / "train.log").read_text().splitlines()
    line = next(line for line in lines if "epoch 1/1 loss" in line and "top-1" in line)
    assert line.endswith(f"(on the first 4 of {images} images: train.eval_max_batches=1)"), line
    first = subprocess.run(
        [*command, "train.eval_max_batches=1"], capture_output=True, text=True, cwd=ROOT
    )
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads(first.stdout)["images"] == 4
    assert (
        f"on 4 of its {images} images (the first 1 batch: train.eval_max_batches=1)" in first.stderr
    )
