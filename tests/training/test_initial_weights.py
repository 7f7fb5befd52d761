"""Starting from saved weights (issue 12): every file form initialises a student and a teacher,
at other sizes, class counts and input channels; every transferred tensor equals its source,
resampled position embeddings equal timm's resampling; anything else is one line."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import HANG, TINY_STUDENT, TINY_TEACHER
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import adapt_input_conv

from cskd.cli import main
from cskd.config import load_config
from cskd.errors import CheckpointError, ConfigError
from cskd.training.models import build_student, load_teacher

VIT = "deit_tiny_distilled_patch16_224"


def _source_vit() -> dict[str, torch.Tensor]:
    """A 10-class, 3-channel, 32 px (8 x 8 grid) distilled ViT's weights."""
    torch.manual_seed(1)
    model = timm.create_model(VIT, num_classes=10, in_chans=3, **TINY_STUDENT)
    return {key: value.clone() for key, value in model.state_dict().items()}


def _write(form: str, state: dict, directory: Path) -> tuple[Path, bool]:
    """Write ``state`` the way another tool would; (path, whether it sits in an EMA entry)."""
    path = directory / ("weights.safetensors" if form == "safetensors" else "weights.pth")
    forms = {
        "plain": state,
        "ddp": {"module." + key: value for key, value in state.items()},
        "compiled": {"_orig_mod." + key: value for key, value in state.items()},
        "deit-main": {"model": state, "epoch": 299, "args": argparse.Namespace(lr=5e-4)},
        "timm-train": {"state_dict": state, "args": argparse.Namespace(model=VIT)},
        "timm-train-ema": {
            "state_dict": {key: torch.zeros_like(value) for key, value in state.items()},
            "state_dict_ema": state,
            "args": argparse.Namespace(model=VIT),
        },
        "deit-main-ema": {"model": {}, "model_ema": state},
    }
    if form == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(forms[form], path)
    return path, form.endswith("-ema")


def _student_config(path: Path, **extra) -> object:
    """A 5-class, 1-channel, 48 px (12 x 12 grid) student starting from ``path``."""
    kwargs = {**TINY_STUDENT, "img_size": 48}
    values = {
        "student.kwargs": str(kwargs).replace("'", ""),
        "student.checkpoint": str(path),
        "data.num_classes": 5,
        "data.in_chans": 1,
        "data.image_size": 48,
        "data.mean": "[0.5]",
        "data.std": "[0.5]",
        "teacher.mean": "[0.5]",
        "teacher.std": "[0.5]",
        **extra,
    }
    return load_config(None, [f"{key}={value}" for key, value in values.items()])


@pytest.mark.parametrize(
    "form",
    [
        "safetensors",
        "plain",
        "ddp",
        "compiled",
        "deit-main",
        "timm-train",
        "timm-train-ema",
        "deit-main-ema",
    ],
)
def test_each_file_form_initialises_a_student_at_another_size_class_count_and_channels(
    tmp_path, form
):
    source = _source_vit()
    path, ema = _write(form, source, tmp_path)
    torch.manual_seed(0)
    fresh = build_student(_student_config(path, **{"student.checkpoint_ema": ema}))
    torch.manual_seed(0)  # the same draws as the fresh model: re-initialised heads equal its own
    student = build_student(
        _student_config(path, **{"student.checkpoint_ema": ema}), initial_weights=True
    )
    loaded, untouched = student.state_dict(), fresh.state_dict()
    for key, value in loaded.items():
        if key.startswith(("head.", "head_dist.")):
            assert value.shape[0] == 5
            torch.testing.assert_close(value, untouched[key], rtol=0, atol=0)
        elif key == "pos_embed":  # 2 token entries + 8 x 8 -> 12 x 12, as timm resamples it
            expected = resample_abs_pos_embed(source[key], [12, 12], num_prefix_tokens=2)
            assert value.shape == (1, 2 + 144, 32)
            torch.testing.assert_close(value, expected, rtol=0, atol=0)
            torch.testing.assert_close(value[:, :2], source[key][:, :2], rtol=0, atol=0)
        elif key == "patch_embed.proj.weight":
            torch.testing.assert_close(value, adapt_input_conv(1, source[key]), rtol=0, atol=0)
        else:
            torch.testing.assert_close(value, source[key], rtol=0, atol=0)


def test_another_patch_size_resamples_the_patch_embedding_as_timm(tmp_path):
    source = _source_vit()
    path, _ = _write("plain", source, tmp_path)
    config = _student_config(
        path,
        **{
            "student.kwargs.patch_size": 8,
            "data.in_chans": 3,
            "data.mean": "[0.5, 0.5, 0.5]",
            "data.std": "[0.5, 0.5, 0.5]",
            "teacher.mean": "[0.5, 0.5, 0.5]",
            "teacher.std": "[0.5, 0.5, 0.5]",
        },
    )
    student = build_student(config, initial_weights=True)
    key = "patch_embed.proj.weight"
    torch.testing.assert_close(
        student.state_dict()[key], resample_patch_embed(source[key], [8, 8]), rtol=0, atol=0
    )
    expected = resample_abs_pos_embed(source["pos_embed"], [6, 6], num_prefix_tokens=2)
    torch.testing.assert_close(student.state_dict()["pos_embed"], expected, rtol=0, atol=0)


def test_reset_head_reinitialises_heads_whose_size_fits(tmp_path):
    source = _source_vit()
    path, _ = _write("plain", source, tmp_path)
    overrides = {"data.num_classes": 10, "student.reset_head": True}
    student = build_student(_student_config(path, **overrides), initial_weights=True)
    state = student.state_dict()
    assert not torch.equal(state["head.weight"], source["head.weight"])
    assert not torch.equal(state["head_dist.weight"], source["head_dist.weight"])
    torch.testing.assert_close(state["cls_token"], source["cls_token"], rtol=0, atol=0)
    kept = build_student(_student_config(path, **{"data.num_classes": 10}), initial_weights=True)
    torch.testing.assert_close(kept.state_dict()["head.weight"], source["head.weight"])


def test_a_student_file_of_another_depth_is_refused_naming_the_keys(tmp_path):
    source = _source_vit()
    path, _ = _write("plain", source, tmp_path)
    config = _student_config(path, **{"student.kwargs.depth": 3})
    with pytest.raises(CheckpointError, match=r"missing keys blocks\.2\..*another architecture"):
        build_student(config, initial_weights=True)


def test_ema_asked_of_a_file_without_one_is_refused(tmp_path):
    path, _ = _write("plain", _source_vit(), tmp_path)
    with pytest.raises(CheckpointError, match="holds no EMA weights"):
        build_student(
            _student_config(path, **{"student.checkpoint_ema": True}), initial_weights=True
        )


def test_initial_weight_keys_that_contradict_each_other_are_refused():
    with pytest.raises(ConfigError, match="both set"):
        load_config(None, ["student.checkpoint=a.pth", "student.pretrained_tag=fb_in1k"])
    with pytest.raises(ConfigError, match="student.reset_head=true needs initial weights"):
        load_config(None, ["student.reset_head=true"])


# ------------------------------------------------------------------------------ the teacher


def _source_resnet(classes: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    model = timm.create_model("resnet18", num_classes=classes, in_chans=3, **TINY_TEACHER)
    return {key: value.clone() for key, value in model.state_dict().items()}


@pytest.mark.parametrize(
    "form", ["safetensors", "plain", "ddp", "compiled", "deit-main", "timm-train"]
)
def test_each_file_form_is_a_teacher_with_other_input_channels(tmp_path, form):
    source = _source_resnet()
    path, _ = _write(form, source, tmp_path)
    teacher = load_teacher(
        "resnet18", path, num_classes=4, in_chans=1, image_size=32, **TINY_TEACHER
    )
    for key, value in teacher.model.state_dict().items():
        expected = adapt_input_conv(1, source[key]) if key == "conv1.weight" else source[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=0)


def test_a_teacher_with_other_classes_names_the_refit_recipe(tmp_path):
    path, _ = _write("plain", _source_resnet(classes=1000), tmp_path)
    with pytest.raises(CheckpointError, match=r"1000-class head.*configs/finetune/teacher_"):
        load_teacher("resnet18", path, num_classes=4, image_size=32, **TINY_TEACHER)
    assert (Path(__file__).parents[2] / "configs/finetune/teacher_resnet50.yaml").is_file()


# ------------------------------------------------------------------------------ full runs


def _cli(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    env_command = [sys.executable, "-m", "cskd", *arguments]
    return subprocess.run(
        env_command,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=HANG,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_a_run_directory_initialises_a_run_at_another_image_size_and_resume_needs_no_file(
    tmp_path, tiny_run
):
    assert main(["train", *tiny_run(**{"optim.epochs": 1, "optim.warmup_epochs": 0})]) == 0
    source = tmp_path / "run"
    overrides = tiny_run(
        **{
            "student.checkpoint": source,
            "student.kwargs.img_size": 48,
            "data.image_size": 48,
            "train.output_dir": tmp_path / "fine",
            "train.stop_after_steps": 2,
            "optim.epochs": 1,
            "optim.warmup_epochs": 0,
        }
    )
    assert main(["train", *overrides]) == 0
    log = (tmp_path / "fine" / "train.log").read_text()
    assert f"initialised from {source / 'student.safetensors'}" in log
    assert "resampled pos_embed from a 8x8 to a 12x12 patch grid" in log
    # resuming takes the weights from last.pt, even when the initial file is gone
    (source / "student.safetensors").rename(tmp_path / "moved.safetensors")
    resumed = [item for item in overrides if not item.startswith("train.stop_after_steps")]
    assert main(["train", *resumed, "train.resume=auto"]) == 0
    assert (tmp_path / "fine" / "train.log").read_text().count(
        "student deit_tiny_distilled_patch16_224: initialised"
    ) == 1
    assert (tmp_path / "fine" / "student.safetensors").is_file()


def _read(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_linear_probe_trains_only_the_heads(tmp_path, tiny_run):
    source = _source_vit()
    path, _ = _write("plain", {**source}, tmp_path)
    overrides = tiny_run(
        **{
            "student.checkpoint": path,
            "student.trainable": "head",
            "student.reset_head": True,
            "distill.method": "none",
            "train.ema": False,
            "optim.epochs": 1,
            "optim.warmup_epochs": 0,
            "optim.lr": 0.05,
            "optim.weight_decay": 0.0,
        }
    )
    assert main(["train", *overrides]) == 0
    trained = _read(tmp_path / "run" / "student.safetensors")
    for key, value in trained.items():
        if key.startswith(("head.", "head_dist.")):
            continue
        torch.testing.assert_close(value, source[key], rtol=0, atol=0, msg=key)
    assert trained["head.weight"].shape == (4, 32)
    assert not torch.equal(trained["head.weight"], source["head.weight"][:4])
    torch.manual_seed(0)
    fresh = timm.create_model(VIT, num_classes=4, **TINY_STUDENT)
    assert not torch.equal(trained["head.weight"], fresh.state_dict()["head.weight"])


def test_mismatches_and_an_unreachable_hub_are_one_line_with_exit_2(tmp_path, tiny_run):
    path, _ = _write("plain", _source_vit(), tmp_path)
    cases = {
        "depth": ("student.checkpoint", path, "student.kwargs.depth=3", "missing keys blocks.2"),
        "hub": (
            "student.pretrained_tag",
            "fb_in1k",
            "data.num_classes=4",
            "could not get timm's deit_tiny_distilled_patch16_224.fb_in1k weights",
        ),
    }
    for name, (key, value, extra, expected) in cases.items():
        output = tmp_path / name
        arguments = tiny_run(**{key: value, "train.output_dir": output})
        result = _cli("train", *arguments, extra, cwd=tmp_path)
        lines = [line for line in result.stderr.splitlines() if line.startswith("cskd ")]
        assert result.returncode == 2, result.stderr[-2000:]
        assert len(lines) == 1 and expected in lines[0], lines
        assert not any((output / name).exists() for name in ("last.pt", "best.pt"))


# ------------------------------------------------------------------------------ exported students


def _val_only_folder(root: Path, classes: int, size: int = 40) -> Path:
    """``root/val/<class>/<image>.png``: greyscale images, no train/ split."""
    generator = torch.Generator().manual_seed(0)
    for index in range(classes):
        (root / "val" / f"class_{index}").mkdir(parents=True)
        for i in range(3):
            pixels = (torch.rand(size, size, generator=generator) * 255).to(torch.uint8)
            from PIL import Image

            Image.fromarray(pixels.numpy(), mode="L").save(
                root / "val" / f"class_{index}" / f"{i}.png"
            )
    return root


def test_an_exported_student_describes_itself_and_rebuilds_from_the_file_alone(tmp_path, tiny_run):
    from cskd.infra.weights import read_export_metadata
    from cskd.training.models import load_student

    assert main(["train", *tiny_run(**{"optim.epochs": 1, "optim.warmup_epochs": 0})]) == 0
    exported = tmp_path / "run" / "student.safetensors"
    info = read_export_metadata(exported)
    assert info["timm_name"] == VIT
    assert info["model_kwargs"] == {**TINY_STUDENT, "num_classes": 4, "in_chans": 3}
    assert info["class_names"] == ["class_0", "class_1", "class_2", "class_3"]
    assert info["input_size"] == [3, 32, 32] and info["inference_rule"] == "cls+dist+patch"
    assert len(info["mean"]) == 3 and info["crop_pct"] == 1.0 and info["method"] == "cskd"

    student = load_student(tmp_path / "run")  # the run directory or the file itself
    assert student.export == info and student.inference_rule == "cls+dist+patch"
    images = torch.randn(2, 3, 32, 32)
    # the documented timm one-liner gives the same model
    plain = timm.create_model(
        info["timm_name"],
        pretrained=True,
        pretrained_cfg_overlay={"file": str(exported), "num_classes": info["num_classes"]},
        **info["model_kwargs"],
    ).eval()
    student.eval()
    torch.testing.assert_close(
        plain(images), (student(images).cls_logits + student(images).dist_logits) / 2
    )
    larger = load_student(exported, image_size=48)
    assert larger.grid_size == (12, 12) and larger.predict(torch.randn(2, 3, 48, 48)).shape == (
        2,
        4,
    )


def test_cskd_eval_takes_an_exported_file_on_a_val_only_folder_at_another_size(
    tmp_path, tiny_run, capsys
):
    overrides = tiny_run(
        **{
            "optim.epochs": 1,
            "optim.warmup_epochs": 0,
            "data.in_chans": 1,
            "data.mean": "[0.5]",
            "data.std": "[0.5]",
            "teacher.kwargs.in_chans": 1,
            "teacher.mean": "[0.5]",
            "teacher.std": "[0.5]",
        }
    )
    assert main(["train", *overrides]) == 0
    folder = _val_only_folder(tmp_path / "photos", classes=4)
    capsys.readouterr()
    arguments = ["eval", "--checkpoint", str(tmp_path / "run" / "student.safetensors")]
    arguments += [f"data.root={folder}", "data.image_size=48", "data.workers=0"]
    assert main(arguments) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 12
    assert set(metrics) >= {"cls", "cls+dist", "cls+dist+patch"}
    # the training checkpoint (last.pt, the same weights) on the same folder gives the same
    folder_data = ["data.dataset=folder", *arguments[3:]]
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), *folder_data]) == 0
    from_checkpoint = json.loads(capsys.readouterr().out)
    assert {k: from_checkpoint[k] for k in metrics} == metrics
    # and the model evaluated is the one resampled as timm resamples
    from cskd.training.models import load_student

    saved = _read(tmp_path / "run" / "student.safetensors")["pos_embed"]
    larger = load_student(tmp_path / "run", image_size=48)
    expected = resample_abs_pos_embed(saved, [12, 12], num_prefix_tokens=2)
    torch.testing.assert_close(larger.state_dict()["pos_embed"], expected, rtol=0, atol=0)
    assert larger.export["input_size"] == [1, 48, 48]
    # a file without cskd metadata is one line
    save_file(_source_vit(), str(tmp_path / "other.safetensors"))
    result = _cli("eval", "--checkpoint", str(tmp_path / "other.safetensors"), cwd=tmp_path)
    assert result.returncode == 2 and "carries no cskd export metadata" in result.stderr


def test_register_tokens_are_kept_when_a_reg_vit_is_resampled(tmp_path):
    """timm's register-token ViTs keep no position embedding for their prefix tokens
    (``no_embed_class``): the grid part alone is resampled, the tokens copied."""
    kwargs = {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2, "reg_tokens": 2}
    kwargs["no_embed_class"] = True
    torch.manual_seed(3)
    source = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10, **kwargs)
    source_state = source.state_dict()
    torch.save(source_state, tmp_path / "reg.pth")
    values = {
        "student.name": "vit_tiny_patch16_224",
        "student.kwargs": str({**kwargs, "img_size": 48}).replace("'", "").replace("True", "true"),
        "student.checkpoint": tmp_path / "reg.pth",
        "data.num_classes": 10,
        "data.image_size": 48,
        "distill.method": "none",
    }
    config = load_config(None, [f"{key}={value}" for key, value in values.items()])
    state = build_student(config, initial_weights=True).state_dict()
    expected = resample_abs_pos_embed(source_state["pos_embed"], [12, 12], num_prefix_tokens=0)
    torch.testing.assert_close(state["pos_embed"], expected, rtol=0, atol=0)
    torch.testing.assert_close(state["reg_token"], source_state["reg_token"], rtol=0, atol=0)
    torch.testing.assert_close(state["cls_token"], source_state["cls_token"], rtol=0, atol=0)


@pytest.mark.parametrize("entry", ["student", "ema"])
def test_a_cskd_checkpoint_and_its_ema_initialise_a_student_and_a_teacher(
    tmp_path, tiny_run, entry
):
    from cskd.infra.checkpoint import read_file

    cnn = {
        "distill.method": "none",
        "student.name": "resnet18",
        "student.kwargs": str(TINY_TEACHER).replace("'", ""),
        "optim.epochs": 1,
        "optim.warmup_epochs": 0,
        "train.output_dir": tmp_path / "cnn",
    }
    assert main(["train", *tiny_run(**cnn)]) == 0
    assert main(["train", *tiny_run(**{"optim.epochs": 1, "optim.warmup_epochs": 0})]) == 0
    vit_saved = read_file(tmp_path / "run" / "best.pt")[entry]
    values = {
        "student.kwargs": str(TINY_STUDENT).replace("'", ""),
        "student.checkpoint": tmp_path / "run" / "best.pt",
        "student.checkpoint_ema": entry == "ema",
        "data.num_classes": 6,  # another class count: heads re-initialised
    }
    config = load_config(None, [f"{key}={value}" for key, value in values.items()])
    student = build_student(config, initial_weights=True).state_dict()
    for key, value in student.items():
        if not key.startswith("head"):
            torch.testing.assert_close(value, vit_saved[key], rtol=0, atol=0)
    assert student["head.weight"].shape == (6, 32)
    # the CNN run's best.pt and its run directory are teachers (4 classes, as the data)
    cnn_saved = read_file(tmp_path / "cnn" / "best.pt")["student"]
    for source in (tmp_path / "cnn" / "best.pt", tmp_path / "cnn"):
        teacher = load_teacher("resnet18", source, num_classes=4, image_size=32, **TINY_TEACHER)
        for key, value in teacher.model.state_dict().items():
            torch.testing.assert_close(value, cnn_saved[key], rtol=0, atol=0)


def test_files_that_cannot_be_adapted_are_refused_before_any_weight_is_touched(tmp_path):
    torch.manual_seed(4)
    plain = timm.create_model("deit_tiny_patch16_224", num_classes=10, **TINY_STUDENT)
    torch.save(plain.state_dict(), tmp_path / "plain_deit.pth")  # no distillation token
    config = _student_config(tmp_path / "plain_deit.pth", **{"data.image_size": 48})
    with pytest.raises(CheckpointError, match=r"missing keys dist_token"):
        build_student(config, initial_weights=True)
    headless = {k: v for k, v in _source_resnet().items() if not k.startswith("fc.")}
    torch.save(headless, tmp_path / "headless.pth")  # a teacher without its classifier
    with pytest.raises(CheckpointError, match=r"missing keys fc.bias, fc.weight"):
        load_teacher("resnet18", tmp_path / "headless.pth", num_classes=4, **TINY_TEACHER)
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(CheckpointError, match="holds a Tensor, not a state dict"):
        load_teacher("resnet18", tmp_path / "tensor.pth", num_classes=4, **TINY_TEACHER)


def test_a_run_directory_s_ema_weights_are_its_student_ema_file(tmp_path, tiny_run):
    assert main(["train", *tiny_run(**{"optim.epochs": 1, "optim.warmup_epochs": 0})]) == 0
    ema = _read(tmp_path / "run" / "student_ema.safetensors")
    raw = _read(tmp_path / "run" / "student.safetensors")
    assert not torch.equal(ema["blocks.0.attn.qkv.weight"], raw["blocks.0.attn.qkv.weight"])
    values = {
        "student.kwargs": str(TINY_STUDENT).replace("'", ""),
        "student.checkpoint": tmp_path / "run",
        "student.checkpoint_ema": True,
        "data.num_classes": 4,
    }
    config = load_config(None, [f"{key}={value}" for key, value in values.items()])
    for key, value in build_student(config, initial_weights=True).state_dict().items():
        torch.testing.assert_close(value, ema[key], rtol=0, atol=0)


def test_timm_tags_reset_heads_on_request_and_a_teacher_tag_of_other_classes_is_refused(
    tmp_path, monkeypatch
):
    """timm's hub is out of reach here: timm's own pretrained loading reads a local file
    instead (``pretrained_cfg_overlay``), everything else is the real path."""
    import cskd.training.models

    source = timm.create_model(VIT, num_classes=1000, **TINY_STUDENT).state_dict()
    save_file(source, str(tmp_path / "hub.safetensors"))
    create = timm.create_model

    def from_local_file(name, pretrained=False, **kwargs):
        overlay = {"file": str(tmp_path / "hub.safetensors")} if pretrained else None
        return create(name, pretrained=pretrained, pretrained_cfg_overlay=overlay, **kwargs)

    monkeypatch.setattr(cskd.training.models.timm, "create_model", from_local_file)
    values = {
        "student.kwargs": str(TINY_STUDENT).replace("'", ""),
        "student.pretrained_tag": "fb_in1k",
        "data.num_classes": 1000,
    }
    arguments = [f"{key}={value}" for key, value in values.items()]
    kept = build_student(load_config(None, arguments), initial_weights=True).state_dict()
    torch.testing.assert_close(kept["head.weight"], source["head.weight"], rtol=0, atol=0)
    reset = build_student(
        load_config(None, [*arguments, "student.reset_head=true"]), initial_weights=True
    ).state_dict()
    assert not torch.equal(reset["head.weight"], source["head.weight"])
    torch.testing.assert_close(reset["cls_token"], source["cls_token"], rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"1000-class head but the data has 5 classes"):
        load_teacher("regnety_160", pretrained_tag="deit_in1k", num_classes=5)
    with pytest.raises(CheckpointError, match=r"Invalid pretrained tag"):
        load_teacher("regnety_160", pretrained_tag="nope", num_classes=1000)
