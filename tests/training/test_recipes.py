"""The shipped recipes: every file loads; the ImageNet runs match DeiT's published recipe and the
paper's setup field by field; bad recipes fail naming the key; each ImageNet run trains for two
steps with shrunken models at the real 224 px shapes (14 x 14 student grid, 7 x 7 teacher map)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import HANG
from photos import photo_folder

from cskd.config import get_value, load_config, to_dict
from cskd.errors import ConfigError
from cskd.method.adapters import DenseStudent, DenseTeacher
from cskd.training.build import amp_dtype, check_lr_schedule, scaled_lr
from cskd.training.engine import Trainer
from cskd.training.models import build_student, build_teacher, teacher_amp_dtype
from cskd.training.run import train
from cskd.training.state import read_checkpoint

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
IMAGENET = CONFIGS / "imagenet"
ALL_RECIPES = sorted(CONFIGS.rglob("*.yaml"))
RUN_FILES = sorted(path.name for path in IMAGENET.glob("[!_]*.yaml"))

# DeiT's recipe as published (method.md, "Recipe and results"), shared by every ImageNet run;
# where the CSKD release's configs/cskd_{tiny,small,base}.py agree, their values too.
PUBLISHED = {
    "optim.name": "adamw",
    "optim.epochs": 300,
    "optim.weight_decay": 0.05,
    "optim.warmup_epochs": 5,
    "optim.warmup_lr": 1e-6,
    "optim.min_lr": 1e-5,
    "optim.schedule_unit": "epoch",  # DeiT and the release step the scheduler once per epoch
    "optim.clip_grad": 0.0,
    "augment.label_smoothing": 0.1,
    "augment.randaugment": "rand-m9-mstd0.5-inc1",
    "augment.reprob": 0.25,
    "augment.mixup": 0.8,
    "augment.cutmix": 1.0,
    "augment.mixup_switch_prob": 0.5,
    "augment.repeated_aug": True,
    "augment.interpolation": "bicubic",
    "train.ema": True,
    "train.ema_decay": 0.99996,
    "data.image_size": 224,
    "data.in_chans": 3,
    "data.dataset": "folder",
    "data.num_classes": 1000,
    "data.eval_crop_pct": 0.875,
    "teacher.name": "regnety_160",
    "teacher.pretrained_tag": "deit_in1k",
    "distill.alpha": 0.5,
    "distill.token_kind": "hard",
    "distill.tau": 1.0,
    "distill.progress": "epoch",
}
GPUS = 8
# The release's configs/cskd_{size}.py, per model: global batch, learning rate, drop path.
RELEASE = {
    "tiny": {"global_batch": 1024, "lr": 1e-3, "drop_path": 0.0},
    "small": {"global_batch": 512, "lr": 5e-4, "drop_path": 0.0},
    "base": {"global_batch": 256, "lr": 2.5e-4, "drop_path": 0.0},
}
# DeiT's own settings for its distilled baselines (DeiT's main.py defaults), every size.
DEIT = {"global_batch": 1024, "lr": 1e-3, "drop_path": 0.1}

STUDENTS = {size: f"deit_{size}_distilled_patch16_224" for size in ("tiny", "small", "base")}
# file -> (student, method, schedule, cskd_kind, best_rule, top-1 in its header comment, settings)
RUNS = {
    "deit_tiny_cskd.yaml": (
        STUDENTS["tiny"],
        "cskd",
        "linear",
        "hard",
        "cls+dist+patch",
        "76.3",
        RELEASE["tiny"],
    ),
    "deit_small_cskd.yaml": (
        STUDENTS["small"],
        "cskd",
        "linear",
        "hard",
        "cls+dist+patch",
        "82.3",
        RELEASE["small"],
    ),
    "deit_base_cskd.yaml": (
        STUDENTS["base"],
        "cskd",
        "linear",
        "hard",
        "cls+dist+patch",
        "83.8",
        RELEASE["base"],
    ),
    "deit_tiny_deit.yaml": (STUDENTS["tiny"], "deit", "linear", "hard", "cls+dist", "74.5", DEIT),
    "deit_small_deit.yaml": (STUDENTS["small"], "deit", "linear", "hard", "cls+dist", "81.2", DEIT),
    "deit_base_deit.yaml": (STUDENTS["base"], "deit", "linear", "hard", "cls+dist", "83.4", DEIT),
    "ablation_dense.yaml": (
        STUDENTS["small"],
        "cskd",
        "dense",
        "hard",
        "cls+dist+patch",
        None,
        RELEASE["small"],
    ),
    "ablation_global.yaml": (
        STUDENTS["small"],
        "cskd",
        "global",
        "hard",
        "cls+dist+patch",
        None,
        RELEASE["small"],
    ),
    "ablation_x2.yaml": (
        STUDENTS["small"],
        "cskd",
        "x2",
        "hard",
        "cls+dist+patch",
        None,
        RELEASE["small"],
    ),
    "ablation_cos.yaml": (
        STUDENTS["small"],
        "cskd",
        "cos",
        "hard",
        "cls+dist+patch",
        None,
        RELEASE["small"],
    ),
    "ablation_soft.yaml": (
        STUDENTS["small"],
        "cskd",
        "linear",
        "soft",
        "cls+dist+patch",
        None,
        RELEASE["small"],
    ),
}


def header(path: Path) -> str:
    """The comment block a recipe opens with."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


# ---------------------------------------------------------------------------- loading


def test_the_recipe_folders_are_found():
    folders = {path.parent.name for path in ALL_RECIPES}
    assert {"imagenet", "fashion_mnist"} <= folders
    assert RUN_FILES == sorted(RUNS), "every ImageNet run file needs a row in RUNS (and back)"


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_every_shipped_recipe_loads_validates_and_builds_its_models(path):
    """Resolves, survives a round trip through its printed form, and its student and teacher
    exist in timm with the recipe's keyword arguments (built on the meta device)."""
    from cskd.config import dump_config, from_dict
    from cskd.training.preflight import check_models

    config = load_config(path)
    again = from_dict(yaml.safe_load(dump_config(config)))
    assert to_dict(again) == to_dict(config)
    check_models(config)  # raises ConfigError for an unknown name or keyword argument
    assert config.student.inference_rule != "auto" and config.train.best_rule != "auto"


# ---------------------------------------------------------------------------- the ImageNet runs


@pytest.mark.parametrize("name", sorted(RUNS))
def test_imagenet_recipe_matches_the_published_recipe(name):
    config = load_config(IMAGENET / name)
    resolved = {key: get_value(config, key) for key in PUBLISHED}
    assert resolved == PUBLISHED
    student, method, schedule, kind, best_rule, _, settings = RUNS[name]
    assert config.student.name == student
    assert config.student.kwargs == {}  # the real model, not a shrunken one
    assert config.distill.method == method
    assert config.distill.schedule == schedule
    assert config.distill.cskd_kind == kind
    assert config.train.best_rule == best_rule
    assert config.train.output_dir == f"runs/imagenet/{name.removesuffix('.yaml')}"


@pytest.mark.parametrize("name", sorted(RUNS))
def test_imagenet_recipe_batch_lr_and_drop_path_match_the_release(name):
    """CSKD runs: the release's configs/cskd_{size}.py; DeiT baselines: DeiT's own settings."""
    config = load_config(IMAGENET / name)
    settings = RUNS[name][-1]
    global_batch = config.data.batch_size * GPUS
    assert global_batch == settings["global_batch"]
    assert scaled_lr(config.optim, global_batch) == pytest.approx(settings["lr"])
    assert config.student.drop_path == settings["drop_path"]
    assert check_lr_schedule(config.optim, global_batch) == pytest.approx(settings["lr"])


@pytest.mark.parametrize("name", sorted(RUNS))
def test_imagenet_recipe_precision_is_the_release_s_teacher_and_bf16_student(name):
    config = load_config(IMAGENET / name)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert teacher_amp_dtype(config.teacher, cuda) == torch.float16  # as released
    assert teacher_amp_dtype(config.teacher, cpu) == torch.float32
    assert amp_dtype(config.train, cuda) == torch.bfloat16  # the stated deviation
    assert "Deviations from the release: " in header(
        IMAGENET / name
    ) or "Deviations from DeiT: " in header(IMAGENET / name)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_imagenet_recipe_header_gives_command_hardware_time_and_result(name):
    text = header(IMAGENET / name)
    assert f"torchrun --nproc_per_node=8 -m cskd train --config configs/imagenet/{name}" in text
    config = load_config(IMAGENET / name)
    assert f"Hardware: 8 GPUs x {config.data.batch_size} images" in text
    assert "Wall time:" in text
    expected_top1 = RUNS[name][-2]
    assert (expected_top1 in text) if expected_top1 else ("Result" in text)


@pytest.mark.parametrize("name", [name for name in RUNS if name.startswith("ablation_")])
def test_ablations_are_small_overrides_of_the_small_cskd_run(name):
    body = [line for line in (IMAGENET / name).read_text().splitlines() if line[:1] not in "#"]
    assert body[0] == "base: deit_small_cskd.yaml"
    assert len(body) <= 4, f"{name} should state only what differs from its base"


@pytest.mark.parametrize("name", [name for name in RUNS if name.endswith("_deit.yaml")])
def test_deit_baselines_are_small_overrides_of_the_deit_recipe(name):
    body = [line for line in (IMAGENET / name).read_text().splitlines() if line[:1] not in "#"]
    assert body[0] == "base: _deit_recipe.yaml"
    assert len(body) <= 4, f"{name} should state only what differs from the DeiT recipe"


@pytest.mark.parametrize("size", sorted(STUDENTS))
def test_real_models_give_a_14x14_student_grid_and_a_7x7_teacher_map(size):
    """The recipe's full-size models at 224 px, shapes only (meta tensors: no memory, no maths)."""
    config = load_config(IMAGENET / f"deit_{size}_cskd.yaml")
    side = config.data.image_size
    with torch.device("meta"):
        student = timm.create_model(config.student.name, pretrained=False)
        teacher = timm.create_model(config.teacher.name, pretrained=False)
        features = teacher.forward_features(torch.empty(1, 3, side, side))  # (1, C_f, H, W)
    assert tuple(student.patch_embed.grid_size) == (14, 14)
    assert tuple(features.shape[-2:]) == (7, 7)


# ---------------------------------------------------------------------------- errors


def test_unknown_override_key_is_named():
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        load_config(IMAGENET / "deit_small_cskd.yaml", ["optim.lrr=1"])


def test_typo_inside_a_recipe_file_is_named(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(f"base: {IMAGENET / 'deit_small_cskd.yaml'}\naugment: {{mixpu: 0.5}}\n")
    with pytest.raises(ConfigError, match=r"augment\.mixpu"):
        load_config(recipe)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.epochs=3.5", r"optim\.epochs: expected int"),
        ("augment.repeated_aug=sometimes", r"augment\.repeated_aug: expected bool"),
        ("optim.lr=-1e-3", r"optim\.lr must be positive"),
        ("distill.progress=batch", r"distill\.progress: 'batch' is not one of epoch, step"),
        ("distill.schedule=linaer", r"distill\.schedule"),
    ],
)
def test_impossible_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(IMAGENET / "deit_small_cskd.yaml", [override])


def test_exponent_floats_are_read_as_floats():
    """PyYAML reads 1e-3 as a string; the schema turns it into the float the user meant."""
    config = load_config(IMAGENET / "deit_small_cskd.yaml", ["optim.lr=1e-3"])
    assert config.optim.lr == 1e-3
    assert scaled_lr(config.optim, 1024) == pytest.approx(2e-3)


def test_missing_imagenet_folder_is_one_clear_line(tmp_path):
    command = [sys.executable, "-m", "cskd", "train", "--config"]
    command += [str(IMAGENET / "deit_small_cskd.yaml"), "data.root=/nonexistent"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cskd train: error:") and "/nonexistent" in lines[0]
    assert "data.root" in lines[0]


# ---------------------------------------------------------------------------- 20-step runs

TINY_VIT = "{embed_dim: 32, depth: 1, num_heads: 2}"  # keeps patch 16 at 224 px: 14 x 14 grid
TINY_CNN = {"channels": [8, 16, 32, 64], "stem_width": 8}  # stride 32: 7 x 7 at 224 px
TINY_CLASSES = 4
STEPS_PER_EPOCH, EPOCHS = 10, 2


@pytest.fixture(scope="module")
def tiny_teacher_224(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=TINY_CLASSES, **TINY_CNN)
    path = tmp_path_factory.mktemp("teacher224") / "teacher.pth"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory) -> Path:
    """4 classes x 10 real photos (JPEG and PNG, 23 to 1054 px, aspect 1:3 to 3:1) for training,
    4 x 2 for validation."""
    root = tmp_path_factory.mktemp("photos")
    return photo_folder(root, classes=TINY_CLASSES, train_per_class=10, val_per_class=2)


def shrunken(output_dir: Path, teacher_checkpoint: str, photo_root: Path) -> list[str]:
    """Overrides that keep a recipe's names, full augmentation (RandAugment, erasing, Mixup/
    CutMix, repeated augmentation) and 224 px shapes, on real photos, with tiny models."""
    return [
        f"student.kwargs={TINY_VIT}",
        "teacher.name=resnet18",
        f"teacher.kwargs={json.dumps(TINY_CNN)}",
        f"teacher.checkpoint={teacher_checkpoint}",
        "teacher.pretrained_tag=",
        f"data.root={photo_root}",
        f"data.num_classes={TINY_CLASSES}",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "data.workers=0",
        "optim.lr_batch_reference=4",  # the recipe's lr per image, at 4 images
        f"optim.epochs={EPOCHS}",
        "optim.warmup_epochs=1",
        "train.device=cpu",
        "train.log_interval=1",
        f"train.max_steps_per_epoch={STEPS_PER_EPOCH}",
        f"train.output_dir={output_dir}",
    ]


def track_training_steps(monkeypatch) -> list:
    """A list that is non-empty exactly while a training step (``Trainer.step``) runs."""
    in_step: list = []
    trainer_step = Trainer.step

    def spy_step(self, *args, **kwargs):
        in_step.append(True)
        try:
            return trainer_step(self, *args, **kwargs)
        finally:
            in_step.pop()

    monkeypatch.setattr(Trainer, "step", spy_step)
    return in_step


@pytest.mark.parametrize("name", sorted(RUNS))
def test_imagenet_recipe_trains_20_steps_on_real_photos_at_224_px(
    name, tmp_path, tiny_teacher_224, photo_root, monkeypatch
):
    config = load_config(IMAGENET / name, shrunken(tmp_path / "run", tiny_teacher_224, photo_root))
    _, method, schedule, *_ = RUNS[name]
    assert (config.student.name, config.data.image_size) == (RUNS[name][0], 224)
    assert config.augment == load_config(IMAGENET / name).augment  # the full augmentation

    teacher_maps, student_grids = [], []
    teacher_forward, student_forward = DenseTeacher.forward, DenseStudent.forward
    in_step = track_training_steps(monkeypatch)  # only teacher calls of training steps count

    def spy_teacher(self, images):
        output = teacher_forward(self, images)
        if in_step:  # (a ViT teacher under DeiT would give global logits only)
            dense = output.dense_logits
            maps = (tuple(images.shape[-2:]), None if dense is None else tuple(dense.shape[-2:]))
            teacher_maps.append(maps)
        return output

    def spy_student(self, images, **kwargs):
        output = student_forward(self, images, **kwargs)
        student_grids.append((self._grid_for(images), kwargs.get("output_grid")))
        return output

    monkeypatch.setattr(DenseTeacher, "forward", spy_teacher)
    monkeypatch.setattr(DenseStudent, "forward", spy_student)
    final = train(config)

    run_dir = tmp_path / "run"
    steps_total = STEPS_PER_EPOCH * EPOCHS
    assert (run_dir / "last.pt").is_file() and (run_dir / "student.safetensors").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in records if record["type"] == "step"]
    assert [record["step"] for record in steps] == list(range(1, steps_total + 1))
    assert all(math.isfinite(record["loss"]) for record in steps)
    # the per-epoch schedule: one learning rate per epoch, warm-up then the cosine
    assert len({record["lr"] for record in steps if record["epoch"] == 0}) == 1
    assert len({record["lr"] for record in steps if record["epoch"] == 1}) == 1
    assert final["images"] == 2 * TINY_CLASSES and "ema" in final
    assert [record["epoch"] for record in records if record["type"] == "epoch"] == [0, 1]
    saved = read_checkpoint(run_dir / "last.pt")
    assert saved["config"]["student"]["name"] == config.student.name
    assert saved["config"]["distill"] == to_dict(config)["distill"]
    if method == "cskd":
        assert all("cskd" in record for record in steps)
        expected = {"global": [0.0, 0.0], "dense": [1.0, 1.0]}.get(schedule, [1.0, None])
        weights = [steps[0]["local_weight"], steps[-1]["local_weight"]]
        assert weights[0] == expected[0]
        assert expected[1] is None or weights[1] == expected[1]
    else:  # a(t) is the objective's, reported only where the method weighs by it
        assert not any("cskd" in record or "local_weight" in record for record in steps)
    training_maps = [shapes for shapes in teacher_maps if shapes[0] == (224, 224)]
    assert len(training_maps) == steps_total  # a CNN teacher gives its 7 x 7 map under DeiT too
    assert {shapes[1] for shapes in training_maps} == {(7, 7)}
    training_grids = [grids for grids in student_grids if grids[1] != (1, 1)]
    assert len(training_grids) == steps_total
    assert {grids[0] for grids in training_grids} == {(14, 14)}
    assert {grids[1] for grids in training_grids} == {(7, 7) if method == "cskd" else None}


def test_shrunken_models_keep_the_recipe_grids(tiny_teacher_224, photo_root, tmp_path):
    config = load_config(
        IMAGENET / "deit_base_cskd.yaml", shrunken(tmp_path, tiny_teacher_224, photo_root)
    )
    student, teacher = build_student(config), build_teacher(config)
    assert student.grid_size == (14, 14) and student.model.embed_dim == 32
    assert teacher(torch.zeros(1, 3, 224, 224)).dense_logits.shape == (1, TINY_CLASSES, 7, 7)


# ---------------------------------------------------------------------------- transfer recipes

FINETUNE = CONFIGS / "finetune"
TRANSFER_RUNS = sorted(
    p.name for p in FINETUNE.glob("[!_]*.yaml") if not p.name.startswith(("teacher", "fashion"))
)
TEACHER_REFITS = sorted(p.name for p in FINETUNE.glob("teacher_*.yaml"))
DATASET_CLASSES = {"cifar10": 10, "cifar100": 100, "stanford_cars": 196, "inat19": 1010}


def test_transfer_recipes_cover_four_datasets_two_sizes_with_and_without_distillation():
    expected = {
        f"{name}_{size}{suffix}.yaml"
        for name in DATASET_CLASSES
        for size in (224, 384)
        for suffix in ("", "_distill")
    }
    assert set(TRANSFER_RUNS) == expected
    assert set(TEACHER_REFITS) == {
        "teacher_resnet50.yaml",
        "teacher_resnet50_probe.yaml",
        "teacher_regnety_160.yaml",
    }


@pytest.mark.parametrize("name", TRANSFER_RUNS)
def test_transfer_recipe_follows_deit_s_published_protocol(name):
    config = load_config(FINETUNE / name)
    dataset, size = name.split("_2")[0].split("_3")[0], 384 if "_384" in name else 224
    assert config.data.num_classes == DATASET_CLASSES[dataset]
    assert config.data.image_size == size
    assert config.student.kwargs.get("img_size", 224) == size  # the model is built for the size
    assert config.data.batch_size * 8 == 768  # published global batch, on 8 GPUs
    if dataset == "inat19":  # deit issues 105 and 141
        optim = ("adamw", 7.5e-5, 768, 0.05, 360)
        assert (config.student.drop_path, config.augment.reprob) == (0.1, 0.1)
        assert "published iNaturalist settings" in header(FINETUNE / "inat19_224.yaml")
    else:  # deit issue 45 (CIFAR-10 and Cars)
        optim = ("sgd", 0.01, 768, 1e-4, 1000)
        assert (config.student.drop_path, config.augment.reprob) == (0.0, 0.0)
        assert "Published (DeiT" in header(FINETUNE / "_transfer.yaml")
    assert (
        config.optim.name,
        config.optim.lr,
        config.optim.lr_batch_reference,
        config.optim.weight_decay,
        config.optim.epochs,
    ) == optim
    base = load_config(FINETUNE / "_transfer.yaml").augment
    assert (config.augment.randaugment, config.augment.mixup, config.augment.cutmix) == (
        base.randaugment,
        base.mixup,
        base.cutmix,
    )
    assert config.student.checkpoint == "runs/imagenet/deit_small_cskd"
    if name.endswith("_distill.yaml"):
        assert config.distill.method == "cskd" and config.teacher.checkpoint.endswith(dataset)
    else:
        assert config.distill.method == "none" and config.student.inference_rule == "cls"


@pytest.fixture(scope="module")
def imagenet_stand_ins(tmp_path_factory) -> dict[str, str]:
    """Tiny 1000-class 'ImageNet' weights (a ViT at 224 px, a ResNet) and a tiny 4-class
    teacher: what the transfer recipes start from, written by the test."""
    root = tmp_path_factory.mktemp("stand_ins")
    torch.manual_seed(0)
    vit = timm.create_model(
        "deit_small_distilled_patch16_224", num_classes=1000, **yaml.safe_load(TINY_VIT)
    )
    cnn = timm.create_model("resnet18", num_classes=1000, **TINY_CNN)
    torch.save({"model": vit.state_dict()}, root / "vit.pth")  # as DeiT saves
    torch.save({"state_dict": cnn.state_dict()}, root / "cnn.pth")  # as timm's train.py saves
    return {"vit": str(root / "vit.pth"), "cnn": str(root / "cnn.pth")}


@pytest.mark.parametrize("name", [*TRANSFER_RUNS, *TEACHER_REFITS])
def test_transfer_and_refit_recipes_train_two_steps_with_stand_ins(
    name, tmp_path, imagenet_stand_ins, tiny_teacher_224, photo_root
):
    overrides = shrunken(tmp_path / "run", tiny_teacher_224, photo_root)
    overrides += ["optim.epochs=1", "optim.warmup_epochs=0", "train.max_steps_per_epoch=2"]
    if name.startswith("teacher"):
        overrides += [
            "student.name=resnet18",
            f"student.kwargs={json.dumps(TINY_CNN)}",
            "student.pretrained_tag=",
            f"student.checkpoint={imagenet_stand_ins['cnn']}",
        ]
    else:
        overrides += [f"student.checkpoint={imagenet_stand_ins['vit']}"]
        if "_384" in name:
            overrides += ["student.kwargs={embed_dim: 32, depth: 1, num_heads: 2, img_size: 384}"]
    config = load_config(FINETUNE / name, overrides)
    size = 384 if "_384" in name else 224
    assert config.data.image_size == size
    train(config)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "re-initialised" in log and "(the file has 1000 classes, the model 4)" in log
    if size == 384:
        assert "resampled pos_embed from a 14x14 to a 24x24 patch grid" in log
    assert (tmp_path / "run" / "student.safetensors").is_file()


def test_imagenet_recipe_trains_from_a_teacher_cache_on_real_photos_without_the_teacher(
    tmp_path, tiny_teacher_224, photo_root, monkeypatch
):
    """`cskd cache` then training with teacher.cache at 224 px with the full augmentation: the
    teacher never runs in a training step; every step's targets are 7 x 7 maps of the cache."""
    from cskd.commands.cache import build_cache
    from cskd.teacher.cached import CachedTeacher

    overrides = [*shrunken(tmp_path / "run", tiny_teacher_224, photo_root)]
    overrides += [f"teacher.cache={tmp_path / 'cache'}", "teacher.cache_shard_size=16"]
    build_cache(load_config(IMAGENET / "deit_small_cskd.yaml", overrides))
    config = load_config(IMAGENET / "deit_small_cskd.yaml", overrides)
    teacher_calls, cached_maps = [], []
    teacher_forward, cached_forward = DenseTeacher.forward, CachedTeacher.forward
    in_step = track_training_steps(monkeypatch)

    def spy_teacher(self, images):
        teacher_calls.append(bool(in_step))
        return teacher_forward(self, images)

    def spy_cached(self, **kwargs):
        output = cached_forward(self, **kwargs)
        cached_maps.append(tuple(output.dense_logits.shape))
        return output

    monkeypatch.setattr(DenseTeacher, "forward", spy_teacher)
    monkeypatch.setattr(CachedTeacher, "forward", spy_cached)
    train(config)
    assert not any(teacher_calls), "the teacher ran inside a training step"
    assert cached_maps == [(4, TINY_CLASSES, 7, 7)] * (STEPS_PER_EPOCH * EPOCHS)
    steps = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["type"] == "step"
    ]
    assert all(math.isfinite(record["cskd"]) and math.isfinite(record["token"]) for record in steps)
