"""Inputs from the field (../shared/field-cases.md, issue 11) that used to end in a traceback or a
silently wrong run: each now gives the right value, or exit status 2 with one line on stderr
naming the problem and the fix, and nothing written that would block a rerun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import timm
import torch
from conftest import HANG
from PIL import Image

from cskd.cli import main
from cskd.config import load_config
from cskd.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def cli(*arguments: str, cwd: Path) -> tuple[int, list[str]]:
    """Run ``cskd`` in a fresh process; (exit status, stderr lines that are not log lines)."""
    result = subprocess.run(
        [sys.executable, "-m", "cskd", *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("cskd ")]
    return result.returncode, lines


# ------------------------------------------------------------------ 1. dict-valued overrides


def test_a_one_key_override_inside_kwargs_keeps_the_other_keys():
    config = load_config(CONFIGS / "fashion_mnist/none.yaml", ["student.kwargs.img_size=48"])
    assert config.student.kwargs == {
        "img_size": 48,
        "patch_size": 4,
        "embed_dim": 64,
        "depth": 4,
        "num_heads": 2,
    }


def test_base_inheritance_merges_kwargs_unless_the_model_changes(tmp_path):
    recipe = tmp_path / "wider.yaml"
    recipe.write_text(
        f"base: {CONFIGS / 'fashion_mnist/cskd.yaml'}\nstudent: {{kwargs: {{embed_dim: 96}}}}\n"
    )
    assert load_config(recipe).student.kwargs == {
        "img_size": 32,
        "patch_size": 4,
        "embed_dim": 96,
        "depth": 4,
        "num_heads": 2,
    }
    # cskd.yaml names another model than its base (teacher.yaml's resnet18): its kwargs replace
    assert "channels" not in load_config(CONFIGS / "fashion_mnist/cskd.yaml").student.kwargs
    # on the command line a whole mapping replaces the kwargs, a dotted key sets one of them
    swapped = load_config(
        CONFIGS / "fashion_mnist/cskd.yaml",
        ["student.name=resnet18", "student.kwargs={channels: [8, 16, 32, 64]}"],
    )
    assert swapped.student.kwargs == {"channels": [8, 16, 32, 64]}
    deeper = load_config(CONFIGS / "fashion_mnist/cskd.yaml", ["student.kwargs.depth=6"])
    assert deeper.student.kwargs["depth"] == 6 and deeper.student.kwargs["embed_dim"] == 64


# ------------------------------------------------------------------ 7. reserved keys in kwargs


@pytest.mark.parametrize(
    ("override", "key", "source"),
    [
        ("student.kwargs.num_classes=4", "student.kwargs.num_classes", "data.num_classes"),
        ("teacher.kwargs.num_classes=1000", "teacher.kwargs.num_classes", "data.num_classes"),
        ("student.kwargs.in_chans=3", "student.kwargs.in_chans", "data.in_chans"),
        ("student.kwargs.pretrained=true", "student.kwargs.pretrained", "weights"),
        ("teacher.kwargs.pretrained=true", "teacher.kwargs.pretrained", "teacher.pretrained_tag"),
    ],
)
def test_reserved_keys_in_kwargs_are_named(override, key, source):
    with pytest.raises(ConfigError, match=rf"{key}.*{source}"):
        load_config(CONFIGS / "fashion_mnist/cskd.yaml", [override])


def test_in_chans_in_teacher_kwargs_is_accepted():
    config = load_config(CONFIGS / "fashion_mnist/cskd.yaml", ["teacher.kwargs.in_chans=1"])
    assert config.teacher.kwargs["in_chans"] == 1


# ------------------------------------------------------------------ 8. typos in kwargs and names


@pytest.mark.parametrize(
    ("override", "named", "suggested"),
    [
        (
            "student.kwargs={img_size: 32, patch_size: 4, embed_dm: 32, depth: 2, num_heads: 2}",
            "student.kwargs.embed_dm",
            "embed_dim",
        ),
        (
            "teacher.kwargs={channels: [8, 16, 32, 64], output_strid: 8}",
            "teacher.kwargs.output_strid",
            "output_stride",
        ),
        (
            "student.name=deit_tiny_distiled_patch16_224",
            "student.name",
            "deit_tiny_distilled_patch16_224",
        ),
        ("teacher.name=resnet81", "teacher.name", "resnet18"),
    ],
)
def test_typos_in_model_names_and_kwargs_are_one_line_before_any_work(
    tmp_path, tiny_run, override, named, suggested
):
    status, lines = cli("train", *tiny_run(), override, cwd=tmp_path)
    assert status == 2 and len(lines) == 1, lines
    assert named in lines[0] and suggested in lines[0]
    assert not (tmp_path / "run" / "config.yaml").exists()


# ------------------------------------------------------------------ 10. a CNN student with cskd


def test_a_cnn_student_with_cskd_trains_on_its_final_map(tmp_path, tiny_run):
    """Refused once (issue 22's case 23); since issue 20 a CNN's final map gets the dense targets
    through its own distillation head (MapStudent), and the run reports every rule."""
    cnn = ["student.name=resnet18", "student.kwargs={channels: [8, 16, 32, 64], output_stride: 8}"]
    overrides = tiny_run(**{"optim.epochs": 1, "optim.warmup_epochs": 0})
    status, lines = cli("train", *overrides, *cnn, cwd=tmp_path)
    assert status == 0, lines
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert {"cls", "cls+dist", "cls+dist+patch"} <= set(final["last_epoch"]), final


def test_a_student_without_a_final_map_is_refused_under_cskd_and_the_folder_stays_usable(
    tmp_path, tiny_run
):
    pit = ["student.name=pit_ti_224", "student.kwargs={img_size: 32}"]
    status, lines = cli("train", *tiny_run(), *pit, cwd=tmp_path)
    assert status == 2 and len(lines) == 1, lines
    assert "not an H x W map" in lines[0] and "distill.method=deit" in lines[0], lines[0]
    # the same folder then takes a valid run without train.overwrite
    assert main(["train", *tiny_run(**{"optim.epochs": 1, "optim.warmup_epochs": 0})]) == 0


def test_a_run_that_never_reached_a_checkpoint_does_not_block_a_rerun(tmp_path, tiny_run):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("student: {}\n")  # what a run that died at step 1 left
    (run_dir / "metrics.jsonl").write_text('{"type": "step", "step": 1, "loss": 1.0}\n')
    assert main(["train", *tiny_run(**{"optim.epochs": 1, "optim.warmup_epochs": 0})]) == 0
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[0]["loss"] != 1.0  # the dead run's records are gone


# ------------------------------------------------------------------ 11. cskd eval that does not fit


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.num_classes=10"],
        ["student.kwargs.depth=3"],
    ],
    ids=["classes", "depth"],  # another image size is evaluated (issue 12: test_initial_weights)
)
def test_eval_with_a_config_that_does_not_fit_the_checkpoint_is_one_line(
    tmp_path, tiny_run, overrides
):
    assert main(["train", *tiny_run(**{"optim.epochs": 1, "optim.warmup_epochs": 0})]) == 0
    status, lines = cli(
        "eval", "--checkpoint", str(tmp_path / "run" / "last.pt"), *overrides, cwd=tmp_path
    )
    assert status == 2 and len(lines) == 1, lines
    assert str(tmp_path / "run" / "last.pt") in lines[0]
    assert any(words in lines[0] for words in ("does not fit", "-class head", "classes differ"))


# ------------------------------------------------------------------ 2. hidden folders


def _folder(root: Path, *, hidden: bool, bits16: bool = False) -> Path:
    rng = numpy.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for index, name in enumerate("abcd"):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                level = 0.3 + 0.15 * index
                pixels = numpy.clip(rng.normal(level, 0.02, (40, 40)), 0, 1)
                if bits16:
                    image = Image.fromarray((pixels * 65535).astype(numpy.uint16))
                else:
                    image = Image.fromarray((pixels * 255).astype(numpy.uint8)).convert("RGB")
                image.save(root / split / name / f"{i}.png")
        if hidden:
            (root / split / ".ipynb_checkpoints").mkdir()
            Image.new("RGB", (40, 40)).save(
                root / split / ".ipynb_checkpoints" / "0-checkpoint.png"
            )
            Image.new("RGB", (40, 40)).save(root / split / "a" / ".hidden.png")
    return root


def test_hidden_folders_and_files_are_not_classes_or_samples(tmp_path):
    from cskd.data import ImageFolderDataset, check_class_folders

    root = _folder(tmp_path / "K2", hidden=True)
    dataset = ImageFolderDataset(root=root, split="train")
    assert dataset.classes == ["a", "b", "c", "d"]
    assert len(dataset) == 16 and not any("/." in path for path in dataset.paths)
    check_class_folders(root)


# ------------------------------------------------------------------ 3. 16-bit greyscale


def test_16_bit_greyscale_images_keep_their_levels(tmp_path):
    from cskd.data import EvalTransform, ImageFolderDataset

    root = _folder(tmp_path / "gray16", hidden=False, bits16=True)
    assert Image.open(root / "val" / "a" / "0.png").mode.startswith("I;16")
    dataset = ImageFolderDataset(
        root=root, split="val", transform=EvalTransform(image_size=32, crop_pct=1.0)
    )
    for index in range(len(dataset)):
        sample = dataset[index]
        expected = 0.3 + 0.15 * sample["target"]
        assert float(sample["image"].mean()) == pytest.approx(expected, abs=0.02)


# ------------------------------------------------------------------ 4. a 1 x 1 teacher map


def test_grids_are_logged_and_a_1x1_teacher_map_is_a_warning(tmp_path, tiny_run):
    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", num_classes=4, channels=[8, 16, 32, 64])  # stride 32
    torch.save(teacher.state_dict(), tmp_path / "teacher32.pth")
    overrides = {
        "teacher.checkpoint": tmp_path / "teacher32.pth",
        "teacher.kwargs": "{channels: [8, 16, 32, 64]}",
        "optim.epochs": 1,
        "optim.warmup_epochs": 0,
    }
    assert main(["train", *tiny_run(**overrides)]) == 0
    text = (tmp_path / "run" / "train.log").read_text()
    assert "student grid 8 x 8 pooled to the teacher grid 1 x 1" in text
    assert "nothing local to distil" in text


# ------------------------------------------------------------------ 5. the rule follows the method


@pytest.mark.parametrize(
    ("method", "rule"), [("none", "cls"), ("deit", "cls+dist"), ("cskd", "cls+dist+patch")]
)
def test_overriding_only_the_method_moves_the_inference_and_best_rules_with_it(method, rule):
    for recipe in ("imagenet/deit_small_cskd.yaml", "fashion_mnist/cskd.yaml"):
        config = load_config(CONFIGS / recipe, [f"distill.method={method}"])
        assert (config.student.inference_rule, config.train.best_rule) == (rule, rule)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (
            ["distill.method=deit", "student.inference_rule=cls+dist+patch"],
            "student.inference_rule",
        ),
        (["distill.method=none", "train.best_rule=cls+dist"], "train.best_rule"),
        (["distill.method=none", "train.best_rule=ema/cls+dist"], "train.best_rule"),
    ],
)
def test_a_rule_using_a_head_the_method_never_trains_is_refused(overrides, key):
    with pytest.raises(ConfigError, match=rf"{key}=.* does not train: use {key}=auto"):
        load_config(CONFIGS / "fashion_mnist/cskd.yaml", overrides)


# ------------------------------------------------------------------ 6. resuming into more epochs


def test_resuming_into_more_epochs_follows_the_longer_schedule(tmp_path, tiny_run):
    short = {"optim.epochs": 2, "train.log_interval": 1}
    assert main(["train", *tiny_run(**short)]) == 0
    longer = {"optim.epochs": 4, "train.log_interval": 1, "train.resume": "auto"}
    assert main(["train", *tiny_run(**longer)]) == 0
    reference_dir = tmp_path / "reference"
    overrides = [o.replace(str(tmp_path / "run"), str(reference_dir)) for o in tiny_run(**longer)]
    assert main(["train", *overrides]) == 0  # planned for 4 epochs from the start

    def rates(run_dir: Path) -> dict[int, float]:
        records = [
            json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        ]
        return {r["step"]: r["lr"] for r in records if r["type"] == "step"}

    resumed, planned = rates(tmp_path / "run"), rates(reference_dir)
    later = [step for step in planned if step > 8]  # epochs 3 and 4
    assert [resumed[step] for step in later] == pytest.approx([planned[step] for step in later])
    assert min(resumed[step] for step in later[:4]) > 1.5e-6  # not stuck at min_lr (1e-6)
    assert (
        "resuming with other settings than the saved run (optim.epochs 2 -> 4)"
        in (tmp_path / "run" / "train.log").read_text()
    )


# ------------------------------------------------------------------ 9. a ViT teacher


@pytest.fixture
def vit_teacher(tmp_path) -> list[str]:
    torch.manual_seed(0)
    kwargs = "{img_size: 32, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}"
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=4,
    )
    torch.save(model.state_dict(), tmp_path / "teacher_vit.pth")
    return [
        "teacher.name=vit_tiny_patch16_224",
        f"teacher.kwargs={kwargs}",
        f"teacher.checkpoint={tmp_path / 'teacher_vit.pth'}",
    ]


def test_a_vit_teacher_distils_with_deit(tmp_path, tiny_run, vit_teacher):
    overrides = tiny_run(**{"optim.epochs": 1, "optim.warmup_epochs": 0, "distill.method": "deit"})
    assert main(["train", *overrides, *vit_teacher]) == 0
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all("token" in r for r in records if r["type"] == "step")


def test_a_vit_teacher_with_cskd_is_one_line(tmp_path, tiny_run, vit_teacher):
    # repeated augmentation on one process would be a warning: it must not add a line
    status, lines = cli(
        "train", *tiny_run(), *vit_teacher, "augment.repeated_aug=true", cwd=tmp_path
    )
    assert status == 2 and len(lines) == 1, lines
    everything = (
        subprocess.run(
            [
                sys.executable,
                "-m",
                "cskd",
                "train",
                *tiny_run(),
                *vit_teacher,
                "augment.repeated_aug=true",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=HANG,
        )
        .stderr.strip()
        .splitlines()
    )
    assert len(everything) == 1, everything  # no warning or log line before the error
    assert "CNN teacher" in lines[0] and "distill.method=deit" in lines[0]
    assert not (tmp_path / "run" / "config.yaml").exists()


# ------------------------------------------------------------------ 13, 14. discoverability


def test_train_help_lists_every_key_with_its_default_and_meaning(tmp_path):
    import dataclasses

    from cskd.config import Config

    result = subprocess.run(
        [sys.executable, "-m", "cskd", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert result.returncode == 0
    listed = {line.split(" = ")[0].strip() for line in result.stdout.splitlines() if " = " in line}
    expected = {
        f"{section.name}.{item.name}"
        for section in dataclasses.fields(Config)
        for item in dataclasses.fields(section.default_factory())
    }
    assert listed == expected
    assert "optim.min_lr = 1e-05  # not scaled with the batch" in result.stdout
    assert all("#" in line for line in result.stdout.splitlines() if " = " in line)


def test_cskd_config_prints_the_resolved_recipe(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cskd",
            "config",
            "--config",
            str(CONFIGS / "fashion_mnist/deit.yaml"),
            "optim.epochs=3",
        ],
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert result.returncode == 0, result.stderr
    import yaml

    resolved = yaml.safe_load(result.stdout)
    assert resolved["optim"]["epochs"] == 3 and resolved["distill"]["method"] == "deit"
    assert resolved["student"]["inference_rule"] == "cls+dist"  # auto, resolved
    assert resolved["train"]["seed"] == 0  # a default the recipe does not state


def test_defaults_that_do_not_fit_one_machine_are_warned(tmp_path, tiny_run):
    import os

    overrides = {"data.workers": (os.cpu_count() or 1) + 4, "augment.repeated_aug": "true"}
    overrides.update({"optim.epochs": 1, "optim.warmup_epochs": 0, "train.max_steps_per_epoch": 1})
    assert main(["train", *tiny_run(**overrides)]) == 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert "exceeds the" in log and "CPU cores" in log
    assert "augment.repeated_aug=true on one process" in log


# ------------------------------------------------------------------ 12. teacher files from the field


def _teacher_state() -> dict:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=4, channels=[8, 16, 32, 64], output_stride=8)
    return model.state_dict()


@pytest.mark.parametrize("form", ["ddp", "compiled", "ddp-in-model", "timm-train", "deit-main"])
def test_teacher_files_of_other_tools_load(tmp_path, form):
    import argparse

    from cskd.training.models import load_teacher

    state = _teacher_state()
    files = {
        "ddp": {"module." + k: v for k, v in state.items()},
        "compiled": {"_orig_mod." + k: v for k, v in state.items()},
        "ddp-in-model": {"model": {"module." + k: v for k, v in state.items()}},
        "timm-train": {
            "epoch": 3,
            "state_dict": state,
            "args": argparse.Namespace(lr=0.1, model="resnet18"),
        },
        "deit-main": {"model": state, "epoch": 299, "args": argparse.Namespace(lr=5e-4)},
    }
    torch.save(files[form], tmp_path / "teacher.pth")
    teacher = load_teacher(
        "resnet18",
        tmp_path / "teacher.pth",
        num_classes=4,
        channels=[8, 16, 32, 64],
        output_stride=8,
    )
    for key, value in teacher.model.state_dict().items():
        torch.testing.assert_close(value, state[key])


def test_a_cskd_run_s_best_pt_works_as_a_teacher(tmp_path, tiny_run):
    cnn = {
        "distill.method": "none",
        "student.name": "resnet18",
        "student.kwargs": "{channels: [8, 16, 32, 64], output_stride: 8}",
        "optim.epochs": 1,
        "optim.warmup_epochs": 0,
        "train.output_dir": tmp_path / "teacher_run",
    }
    assert main(["train", *tiny_run(**cnn)]) == 0
    overrides = {"teacher.checkpoint": tmp_path / "teacher_run" / "best.pt", "optim.epochs": 1}
    assert main(["train", *tiny_run(**overrides, **{"optim.warmup_epochs": 0})]) == 0


def test_a_run_saved_with_an_explicit_rule_of_another_method_still_evaluates(
    tmp_path, tiny_run, capsys
):
    """Runs saved before rules followed the method (deit with cls+dist+patch) load for
    ``cskd eval`` and ``cskd diagnose``: a saved run is evaluated under every rule anyway."""
    import yaml

    assert (
        main(
            [
                "train",
                *tiny_run(
                    **{"optim.epochs": 1, "optim.warmup_epochs": 0, "distill.method": "deit"}
                ),
            ]
        )
        == 0
    )
    run_dir = tmp_path / "run"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["student"]["inference_rule"] = "cls+dist+patch"  # as an older version wrote it
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    checkpoint["config"]["student"]["inference_rule"] = "cls+dist+patch"
    checkpoint.pop("cskd_digest", None)
    torch.save(checkpoint, run_dir / "old.pt")
    assert main(["eval", "--checkpoint", str(run_dir / "old.pt")]) == 0
    assert main(["diagnose", str(run_dir), "--images", "8"]) == 0
    assert "cls+dist+patch" in json.loads(capsys.readouterr().out.split("\n}\n")[0] + "\n}")


def test_resuming_without_the_overrides_of_the_first_command_names_them():
    """The README's example: a run started with `optim.epochs=20 distill.schedule=cos`, resumed
    with `train.resume=auto` alone: the resumed run names both keys it now sets otherwise."""
    from cskd.config import to_dict
    from cskd.training.state import changed_settings

    recipe = "configs/fashion_mnist/cskd.yaml"
    root = Path(__file__).resolve().parents[2]
    first = load_config(root / recipe, ["optim.epochs=20", "distill.schedule=cos"])
    again = load_config(root / recipe, ["train.resume=auto"])
    changes = changed_settings(to_dict(first), to_dict(again))
    assert changes == ["distill.schedule cos -> linear", "optim.epochs 20 -> 6"], changes
