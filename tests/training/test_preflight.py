"""Bad inputs are refused before training starts: one line on stderr, exit status 2.

Every case goes through ``cskd.cli.main(["train", ...])`` on tiny models and asserts the message,
the exit status and that no training step ran (no checkpoint written). The messages, as printed,
are recorded in docs/results/reliability.md.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import TINY_STUDENT, TINY_TEACHER
from PIL import Image
from torch import nn

from cskd.cli import main
from cskd.infra.checkpoint import save_atomic
from cskd.method.adapters import TeacherOutput
from cskd.training.preflight import chance_threshold, check_teacher_accuracy

CLASSES = ("a", "b", "c", "d")


def make_image_folder(root: Path, *, classes=CLASSES, train_per_class=8, val_per_class=2) -> Path:
    """root/{train,val}/<class>/<n>.png: 32 px RGB noise."""
    generator = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for number in range(count):
                pixels = generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{number}.png")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images") / "data")


def folder_run(tiny_run, root: Path, **extra) -> list[str]:
    return tiny_run(**{"data.dataset": "folder", "data.root": str(root), **extra})


def refused(overrides: list[str], capsys, run_dir: Path | None = None) -> str:
    """Run ``cskd train``; assert exit 2, one error line and no training step; return the line."""
    code = main(["train", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("cskd train: error: ")]
    assert len(lines) == 1, err
    if run_dir is not None:
        assert not (run_dir / "last.pt").exists(), "training started"
        assert not (run_dir / "metrics.jsonl").exists(), "training started"
    return lines[0].removeprefix("cskd train: error: ")


def save_model(path: Path, name: str, **kwargs) -> str:
    torch.manual_seed(0)
    torch.save(timm.create_model(name, pretrained=False, **kwargs).state_dict(), path)
    return str(path)


# ---------------------------------------------------------------------------------- data


def test_missing_empty_or_non_directory_data_root(tmp_path, tiny_run, capsys):
    run_dir = tmp_path / "run"
    missing = tmp_path / "nowhere"
    line = refused(folder_run(tiny_run, missing), capsys, run_dir)
    assert line.startswith(
        f"data.root {missing} does not exist: set it to the folder holding train/"
    )
    assert line.count(str(missing)) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    line = refused(folder_run(tiny_run, empty), capsys, run_dir)
    assert line.startswith(f"data.root {empty} is empty: it should hold train/<class>/<image>")
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert "is not a directory" in refused(folder_run(tiny_run, a_file), capsys, run_dir)
    line = refused(tiny_run(**{"data.dataset": "folder", "data.root": ""}), capsys, run_dir)
    assert line.startswith("cskd train needs a recipe: pass --config") and "data.root" in line
    # without a recipe, an override that breaks the ImageNet defaults does not hide it
    assert main(["train", "optim.epochs=1"]) == 2
    assert (
        capsys.readouterr().err.strip().startswith("cskd train: error: cskd train needs a recipe")
    )


@pytest.mark.parametrize("kind", ["missing", "holds other files"])
def test_a_wrong_fashion_mnist_root_names_it_once_and_the_fix(tmp_path, tiny_run, capsys, kind):
    root = tmp_path / "fashion"
    if kind == "holds other files":
        root.mkdir()
        (root / "notes.txt").write_text("not Fashion-MNIST")
    overrides = {"data.dataset": "fashion_mnist", "data.root": root, "data.in_chans": 1}
    overrides |= {
        f"{section}.{key}": "[0.5]" for section in ("data", "teacher") for key in ("mean", "std")
    }
    line = refused(tiny_run(**overrides), capsys, tmp_path / "run")
    assert line.count(str(root)) == 1, line
    assert 'data.root=""' in line and "Debian package" in line, line


def test_class_folders_that_differ_between_train_and_val(tmp_path, tiny_run, capsys):
    root = make_image_folder(tmp_path / "data", val_per_class=1)
    (root / "val" / "d").rename(root / "val" / "e")
    line = refused(folder_run(tiny_run, root), capsys, tmp_path / "run")
    assert line.startswith(f"class folders differ between {root / 'train'} and {root / 'val'}")
    assert "train/d" in line and "val/e" in line


def test_num_classes_unlike_the_data(image_folder, tiny_run, tmp_path, capsys):
    line = refused(folder_run(tiny_run, image_folder, **{"data.num_classes": 5}), capsys)
    assert line.startswith("data.num_classes=5 but the folder dataset has 4 classes")


def test_a_corrupt_image_is_named_or_skipped_and_counted(tmp_path, image_folder, tiny_run, capsys):
    root = tmp_path / "data"
    shutil.copytree(image_folder, root)
    broken = root / "train" / "c" / "3.png"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated mid-image
    line = refused(folder_run(tiny_run, root), capsys, tmp_path / "run")
    assert line.startswith(f"corrupt or truncated image {broken} (")
    assert line.endswith(
        "delete or replace it, or set data.skip_corrupt=true to skip unreadable images"
    )

    short = {"optim.epochs": 1, "optim.warmup_epochs": 0, "train.max_steps_per_epoch": 1}
    overrides = folder_run(tiny_run, root, **{"data.skip_corrupt": True}, **short)
    assert main(["train", *overrides]) == 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert "pre-flight: 1 corrupt image(s) of the 32 train images checked will be skipped" in log
    assert str(broken) in log and "pre-flight: 8 val images checked, none corrupt" in log


# ---------------------------------------------------------------------------------- models


def test_teacher_with_another_number_of_classes_names_both(tmp_path, tiny_run, capsys):
    path = save_model(tmp_path / "t1000.pth", "resnet18", num_classes=1000, **TINY_TEACHER)
    line = refused(tiny_run(**{"teacher.checkpoint": path}), capsys, tmp_path / "run")
    assert line.startswith(
        f"checkpoint {path} has a 1000-class head but the teacher resnet18 is built for 4 "
        "classes (data.num_classes=4): fc.weight (1000, 64) vs (4, 64)"
    )


def test_teacher_whose_head_cannot_give_dense_logits(tmp_path, tiny_run, capsys):
    kwargs = {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}
    path = save_model(tmp_path / "convnext.pth", "convnext_atto", num_classes=4, **kwargs)
    overrides = {
        "teacher.name": "convnext_atto",
        "teacher.checkpoint": path,
        "teacher.kwargs": str(kwargs).replace("'", ""),
    }
    line = refused(tiny_run(**overrides), capsys, tmp_path / "run")
    assert line.startswith("teacher convnext_atto: its head (head (NormMlpClassifierHead))")
    assert "is not affine after global average pooling" in line and "distill.method=deit" in line


def test_student_grid_smaller_than_the_teacher_grid(tmp_path, tiny_run, capsys):
    coarse = str({**TINY_STUDENT, "patch_size": 16}).replace("'", "")  # 2 x 2 patches at 32 px
    line = refused(tiny_run(**{"student.kwargs": coarse}), capsys, tmp_path / "run")
    assert line.startswith("student grid 2x2 is smaller than the teacher grid 4x4")


def test_cnn_student_map_smaller_than_the_teacher_grid_is_not_told_about_patches(
    tmp_path, tiny_run, capsys
):
    # a ResNet student at its native stride 32: a 1 x 1 map at 32 px, the teacher's is 4 x 4
    overrides = {"student.name": "resnet18", "student.kwargs": "{channels: [8, 16, 32, 64]}"}
    line = refused(tiny_run(**overrides), capsys, tmp_path / "run")
    assert line.startswith("student map 1x1 (resnet18's final feature map at 32 px) is smaller")
    assert "student.kwargs.output_stride" in line and "patch" not in line


def test_student_built_for_another_image_size(tmp_path, tiny_run, capsys):
    default_size = str({k: v for k, v in TINY_STUDENT.items() if k != "img_size"})
    line = refused(
        tiny_run(**{"student.kwargs": default_size.replace("'", "")}), capsys, tmp_path / "run"
    )
    assert line.startswith(
        "student deit_tiny_distilled_patch16_224 is built for 224x224 px images but "
        "data.image_size is 32: set student.kwargs.img_size=32"
    )


# ---------------------------------------------------------------------------------- checkpoints


def test_teacher_checkpoint_missing_unreadable_or_of_another_architecture(
    tmp_path, tiny_run, capsys
):
    run_dir = tmp_path / "run"
    missing = tmp_path / "missing.pth"
    line = refused(tiny_run(**{"teacher.checkpoint": str(missing)}), capsys, run_dir)
    assert line.startswith(f"teacher.checkpoint {missing} does not exist: check the path")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"definitely not a checkpoint" * 10)
    line = refused(tiny_run(**{"teacher.checkpoint": str(garbage)}), capsys, run_dir)
    assert line.startswith(f"cannot read checkpoint {garbage}: ")
    other = save_model(tmp_path / "r34.pth", "resnet34", num_classes=4, **TINY_TEACHER)
    line = refused(tiny_run(**{"teacher.checkpoint": other}), capsys, run_dir)
    assert line.startswith(
        f"checkpoint {other} does not fit the teacher resnet18 (ResNet): unexpected keys layer1.2."
    )


def test_resume_checkpoint_missing_unreadable_incomplete_or_of_another_architecture(
    tmp_path, tiny_run, teacher_checkpoint, capsys
):
    run_dir = tmp_path / "run"
    missing = tmp_path / "missing.pt"
    line = refused(tiny_run(**{"train.resume": str(missing)}), capsys, run_dir)
    assert line == f"checkpoint {missing} does not exist: check the path"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 300)
    line = refused(tiny_run(**{"train.resume": str(garbage)}), capsys, run_dir)
    assert line.startswith(f"cannot read checkpoint {garbage}: ")
    line = refused(tiny_run(**{"train.resume": teacher_checkpoint}), capsys, run_dir)
    assert line.startswith(f"{teacher_checkpoint} is not a complete cskd training checkpoint")

    deeper = tmp_path / "deeper.pt"
    student = timm.create_model(
        "deit_tiny_distilled_patch16_224", num_classes=4, **{**TINY_STUDENT, "depth": 3}
    )
    fields = ("optimizer", "scheduler", "state", "rng", "config")
    save_atomic({"student": student.state_dict(), **{key: {} for key in fields}}, deeper)
    line = refused(tiny_run(**{"train.resume": str(deeper)}), capsys, run_dir)
    assert line.startswith(
        f"checkpoint {deeper} does not fit the student deit_tiny_distilled_patch16_224 "
        "(VisionTransformerDistilled): unexpected keys blocks.2."
    )


# ---------------------------------------------------------------------------------- config and run


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "unknown config key train.epoch: valid keys in train are amp,"),
        ("data.batch_size=abc", "data.batch_size: expected int, got str 'abc'"),
        ("data.batch_size=0", "data.batch_size must be positive, got 0"),
        ("augment.reprob=1.5", "augment.reprob must lie in [0, 1], got 1.5"),
        ("distill.schedule=sqrt", "distill.schedule: 'sqrt' is not one of"),
    ],
)
def test_bad_config_values(override, message, tmp_path, tiny_run, capsys):
    assert refused([*tiny_run(), override], capsys, tmp_path / "run").startswith(message)


def test_output_directory_holding_another_run(tmp_path, tiny_run, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("data: {}\n")
    (run_dir / "best.pt").write_bytes(b"a checkpoint of another run")  # results to lose
    line = refused(tiny_run(), capsys)
    assert line == (
        f"train.output_dir {run_dir} already holds a run: pass train.resume=auto to continue it, "
        "train.overwrite=true to replace it, or choose another train.output_dir"
    )
    assert (run_dir / "config.yaml").read_text() == "data: {}\n", "the other run was touched"


# ---------------------------------------------------------------------------------- teacher check


def test_a_teacher_near_chance_is_a_warning_not_an_error(tmp_path, tiny_run):
    short = {"optim.epochs": 1, "optim.warmup_epochs": 0, "train.max_steps_per_epoch": 1}
    assert main(["train", *tiny_run(**short)]) == 0  # a randomly initialised teacher
    log = (tmp_path / "run" / "train.log").read_text()
    assert "pre-flight: teacher resnet18 top-1 " in log
    assert "on 8 validation images, near chance (25.0%): it would teach noise" in log


class OracleTeacher(nn.Module):
    """Predicts the class written into the image's first pixel (the stub of a good teacher)."""

    name = "oracle"
    num_classes = 4

    def renormalize(self, images, *, mean, std):
        return images * std + mean  # back to the pixels: the oracle reads them

    def forward(self, images: torch.Tensor) -> TeacherOutput:
        classes = images[:, 0, 0, 0].round().long()  # (N,)
        logits = nn.functional.one_hot(classes, 4).float()  # (N, 4)
        return TeacherOutput(dense_logits=logits[:, :, None, None], global_logits=logits)


def test_teacher_accuracy_is_measured_on_an_evenly_spaced_slice_and_logged(caplog):
    val_set = [{"image": torch.full((3, 8, 8), float(i % 4)), "target": i % 4} for i in range(40)]
    identity = (torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    logger = logging.getLogger("cskd")
    logger.addHandler(caplog.handler)  # the cskd logger does not propagate to the root
    try:
        common = dict(num_classes=4, batch_size=7, device=torch.device("cpu"), limit=12)
        top1 = check_teacher_accuracy(OracleTeacher(), val_set, student_norm=identity, **common)
        assert top1 == 100.0
        assert "teacher oracle top-1 100.0% on 12 validation images (chance 25.0%)" in caplog.text
        wrong = [{**sample, "target": (sample["target"] + 1) % 4} for sample in val_set]
        check_teacher_accuracy(OracleTeacher(), wrong, student_norm=identity, **common)
        assert "teacher oracle top-1 0.0% on 12 validation images, near chance" in caplog.text
    finally:
        logger.removeHandler(caplog.handler)
    assert chance_threshold(10) == 20.0 and chance_threshold(4) == 50.0
    assert chance_threshold(2) == 75.0  # halfway to 100%, not 2 x 50%
