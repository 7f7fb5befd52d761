"""The teacher-response cache: building it (invariant to shards, loader workers and resumption),
refusing a stale or damaged one, rebuilding the exact view's targets, and training from it."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import HANG, TINY_TEACHER
from timm.data import Mixup

from cskd.cli import main
from cskd.config import load_config
from cskd.errors import CacheError
from cskd.method.adapters import TeacherOutput
from cskd.method.distiller import Distiller
from cskd.method.losses import ObjectiveWeights
from cskd.teacher.cached import CachedTeacher, mix_with_partner_weights
from cskd.teacher.store import open_cache
from cskd.training.engine import Trainer
from cskd.training.models import build_teacher

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from common import memory_cache  # noqa: E402  (the benchmarks' in-memory cache)


def cache_args(tiny_run, cache: Path, **extra) -> list[str]:
    values = {"teacher.cache": str(cache), "teacher.cache_shard_size": 8, **extra}
    return tiny_run(**values)


def build(tiny_run, cache: Path, capsys=None, **extra) -> int:
    return main(["cache", *cache_args(tiny_run, cache, **extra)])


def arrays(cache: Path) -> dict[str, np.ndarray]:
    """Every image's stored arrays, concatenated over shards, by kind."""
    header = json.loads((cache / "cache.json").read_text())
    out: dict[str, list] = {}
    for record in header["shards"]:
        for name in sorted(record["files"]):
            kind = name.split("-")[-1].removesuffix(".npy")
            out.setdefault(kind, []).append(np.load(cache / name))
    return {kind: np.concatenate(parts) for kind, parts in out.items()}


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cskd ")]
    assert len(lines) == 1, lines
    return lines[0]


# ----------------------------------------------------------------------------- building


def test_cache_holds_the_teachers_dense_logits_of_every_whole_image(tiny_run, tmp_path):
    cache = tmp_path / "cache"
    assert build(tiny_run, cache, **{"teacher.cache_dtype": "float32"}) == 0
    header = json.loads((cache / "cache.json").read_text())
    assert header["format"] == "cskd-teacher-cache" and header["version"] == 1
    assert header["images"] == 32 and len(header["shards"]) == 4
    assert header["map_grid"] == [4, 4] and header["train_grid"] == [4, 4]
    # the reference: the teacher itself on each whole image at the training size
    config = load_config(None, cache_args(tiny_run, cache))
    teacher = build_teacher(config, method="cskd")
    from cskd.data import build_datasets
    from cskd.teacher.store import FullImageTransform, with_transform

    train_set, _ = build_datasets(config.data, config.augment)
    view = with_transform(train_set, FullImageTransform(size=32))
    images = torch.stack([view[i]["image"] for i in range(len(view))])
    mean = torch.tensor(config.teacher.mean).view(1, -1, 1, 1)
    std = torch.tensor(config.teacher.std).view(1, -1, 1, 1)
    expected = teacher((images - mean) / std).dense_logits
    stored = arrays(cache)
    # (batches of another size may change the last bits of float arithmetic)
    torch.testing.assert_close(torch.from_numpy(stored["logits"]), expected, atol=1e-5, rtol=1e-5)
    assert (stored["sizes"] == 32).all()  # synthetic originals are 32 x 32


def test_generation_does_not_depend_on_shards_workers_or_resumption(tiny_run, tmp_path):
    """Bit for bit, for shard sizes that are multiples of the teacher's batch (the batches then
    cover the same images; another batch size may change the last bits of float arithmetic)."""
    assert build(tiny_run, tmp_path / "a", **{"data.eval_batch_size": 8}) == 0
    shards_of_16 = {"teacher.cache_shard_size": 16, "data.eval_batch_size": 8}
    assert build(tiny_run, tmp_path / "b", **shards_of_16) == 0
    two_workers = {"data.workers": 2, "data.eval_batch_size": 8}
    assert build(tiny_run, tmp_path / "c", **two_workers) == 0
    reference = arrays(tmp_path / "a")
    for other in ("b", "c"):
        for kind, values in arrays(tmp_path / other).items():
            assert np.array_equal(values, reference[kind]), (other, kind)
    # a killed build: one shard and the header never written; the rerun builds only that shard
    cache = tmp_path / "a"
    kept = (cache / "shard-00000-logits.npy").stat().st_mtime_ns
    for path in [cache / "cache.json", *cache.glob("shard-00002*")]:
        path.unlink()
    assert build(tiny_run, cache, **{"data.eval_batch_size": 8}) == 0
    assert (cache / "shard-00000-logits.npy").stat().st_mtime_ns == kept
    for kind, values in arrays(cache).items():
        assert np.array_equal(values, reference[kind]), kind


def test_a_build_killed_while_recording_its_settings_is_rerun(tiny_run, tmp_path):
    """The directory then holds only the settings record's temporary file: that is a cache
    being started, not "a non-empty directory that holds no cache". (It is also what a slower
    rank used to see under torchrun once rank 0 had begun recording the settings.)"""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ".build.json.k1ll3d.tmp").write_text('{"images": 3')
    assert build(tiny_run, cache, **{"data.eval_batch_size": 8}) == 0
    assert (cache / "cache.json").is_file()
    assert not list(cache.glob(".*.tmp"))


def test_topk_storage_keeps_each_cells_largest_logits(tiny_run, tmp_path):
    assert build(tiny_run, tmp_path / "full", **{"teacher.cache_dtype": "float32"}) == 0
    assert build(tiny_run, tmp_path / "top2", **{"teacher.cache_topk": 2}) == 0
    full = open_cache(tmp_path / "full").maps(torch.arange(32))[0]
    top2 = open_cache(tmp_path / "top2").maps(torch.arange(32))[0]
    values, classes = full.topk(2, dim=1)
    assert torch.equal(top2.argmax(1), full.argmax(1))
    torch.testing.assert_close(top2.gather(1, classes), values, atol=2e-2, rtol=1e-3)
    rest = torch.ones_like(top2, dtype=torch.bool).scatter_(1, classes, False)
    # classes outside the top k read as the cell's k-th logit, never above it
    assert (top2[rest].view(32, 2, 4, 4) <= top2.gather(1, classes)[:, 1:2] + 1e-6).all()


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "change, named",
    [
        ({"data.synthetic_size": 40}, "data digest"),
        ({"data.image_size": 48, "student.kwargs.img_size": 48}, "image size"),
        ({"teacher.name": "resnet10t"}, "teacher name"),
    ],
)
def test_a_cache_made_for_another_run_is_refused(tiny_run, tmp_path, capsys, change, named):
    cache = tmp_path / "cache"
    assert build(tiny_run, cache) == 0
    capsys.readouterr()
    run = cache_args(tiny_run, cache, **change)
    if "teacher.name" in change:  # a resnet10t file of its own, for the same classes
        path = tmp_path / "other.pth"
        torch.save(timm.create_model("resnet10t", num_classes=4).state_dict(), path)
        run += [f"teacher.checkpoint={path}", "teacher.kwargs={}"]
    assert main(["train", *run]) == 2
    line = error_line(capsys)
    assert named in line and "rebuild it with `cskd cache`" in line
    assert not (tmp_path / "run" / "last.pt").exists()


def test_other_teacher_weights_or_classes_are_refused(tiny_run, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert build(tiny_run, cache) == 0
    torch.manual_seed(1)
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet18", num_classes=4, **TINY_TEACHER).state_dict(), other)
    capsys.readouterr()
    assert main(["train", *cache_args(tiny_run, cache, **{"teacher.checkpoint": other})]) == 2
    assert "teacher weights sha256" in error_line(capsys)
    # the same teacher architecture refit for 3 classes, and 3-class data
    torch.save(timm.create_model("resnet18", num_classes=3, **TINY_TEACHER).state_dict(), other)
    run = cache_args(tiny_run, cache, **{"teacher.checkpoint": other, "data.num_classes": 3})
    assert main(["train", *run]) == 2
    assert "another num classes (4, this run: 3" in error_line(capsys)


@pytest.mark.parametrize("damage", ["truncated", "missing", "unfinished", "altered"])
def test_a_damaged_cache_is_refused_in_one_line(tiny_run, tmp_path, capsys, damage):
    cache = tmp_path / "cache"
    assert build(tiny_run, cache) == 0
    shard = cache / "shard-00001-logits.npy"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "missing":
        shard.unlink()
    elif damage == "unfinished":
        (cache / "cache.json").unlink()
    else:  # same length, one byte changed
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["train", *cache_args(tiny_run, cache)]) == 2
    line = error_line(capsys)
    expected = {
        "truncated": "damaged or truncated",
        "altered": "damaged or truncated",
        "missing": "is missing",
        "unfinished": "unfinished",
    }[damage]
    assert expected in line, line
    assert not (tmp_path / "run" / "last.pt").exists()
    # the fix the line gives works: rerunning `cskd cache` repairs it, then training runs
    if damage in ("truncated", "altered"):
        shard.unlink()
    assert build(tiny_run, cache) == 0
    assert main(["train", *cache_args(tiny_run, cache)]) == 0


def test_building_into_a_directory_of_another_cache_is_refused(tiny_run, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert build(tiny_run, cache) == 0
    before = sorted(path.name for path in cache.iterdir())
    capsys.readouterr()
    assert build(tiny_run, cache, **{"teacher.cache_size": 64}) == 2
    assert "holds a cache built with other settings" in error_line(capsys)
    assert sorted(path.name for path in cache.iterdir()) == before
    capsys.readouterr()
    assert main(["cache", *tiny_run(**{"teacher.cache": ""})]) == 2
    assert "needs teacher.cache" in error_line(capsys)


# --------------------------------------------------------------- targets for the exact view


def tiny_cache(maps: torch.Tensor, *, sizes: torch.Tensor, grid) -> CachedTeacher:
    """A CachedTeacher over in-memory maps (N, K, Hc, Wc), as if read from disk."""
    return CachedTeacher(memory_cache(maps, sizes, train_grid=grid))


def test_the_whole_image_crop_gives_the_stored_map_and_its_mean():
    maps = torch.randn(3, 5, 4, 4)
    teacher = tiny_cache(maps, sizes=torch.tensor([[28, 28], [40, 20], [7, 9]]), grid=(4, 4))
    crop = torch.tensor([[0, 0, 28, 28], [0, 0, 40, 20], [0, 0, 7, 9]], dtype=torch.float32)
    out = teacher(index=torch.arange(3), crop=crop, flip=torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(out.dense_logits, maps)
    torch.testing.assert_close(out.global_logits, maps.mean(dim=(2, 3)))


def test_a_crop_on_cell_boundaries_gives_those_cells_pooled_and_mirrored():
    maps = torch.randn(2, 3, 8, 8)
    teacher = tiny_cache(maps, sizes=torch.tensor([[64, 64], [64, 64]]), grid=(2, 2))
    # image 0: the top-left 32 x 32 px = cells 0..3 x 0..3, 2 x 2 blocks averaged;
    # image 1: rows 16..47, columns 32..63 = cells 2..5 x 4..7, then mirrored
    crop = torch.tensor([[0, 0, 32, 32], [16, 32, 32, 32]], dtype=torch.float32)
    out = teacher(index=torch.arange(2), crop=crop, flip=torch.tensor([False, True]))
    pool = torch.nn.functional.avg_pool2d
    torch.testing.assert_close(out.dense_logits[0], pool(maps[0, :, :4, :4], 2))
    torch.testing.assert_close(out.dense_logits[1], pool(maps[1, :, 2:6, 4:8], 2).flip(-1))


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_partner_weights_describe_timms_own_mixing(mode, kind):
    torch.manual_seed(0)
    np.random.seed(0)
    images = torch.randn(6, 3, 16, 16)
    mixup = Mixup(
        mixup_alpha=0.8 if kind == "mixup" else 0.0,
        cutmix_alpha=1.0 if kind == "cutmix" else 0.0,
        mode=mode,
        num_classes=4,
    )
    mixed, targets, partner = mix_with_partner_weights(mixup, images.clone(), torch.arange(6) % 4)
    assert mixed.shape == images.shape and targets.shape == (6, 4)
    weight = partner[:, None]
    torch.testing.assert_close(mixed, (1 - weight) * images + weight * images.flip(0))
    if kind == "cutmix":
        assert set(partner.unique().tolist()) <= {0.0, 1.0}
    assert (partner > 0).any()


def test_mixed_targets_take_the_partners_cells_in_proportion():
    maps = torch.randn(4, 3, 4, 4)
    teacher = tiny_cache(maps, sizes=torch.full((4, 2), 32), grid=(4, 4))
    partner = torch.zeros(4, 32, 32)
    partner[:, :16, :] = 1.0  # the top half is the partner's (CutMix)
    partner[:, 16:, :] = 0.25  # the bottom a quarter (as Mixup would)
    crop = torch.tensor([[0, 0, 32, 32]] * 4, dtype=torch.float32)
    out = teacher(
        index=torch.arange(4), crop=crop, flip=torch.zeros(4, dtype=torch.bool), partner=partner
    )
    expected = maps.clone()
    expected[:, :, :2] = maps.flip(0)[:, :, :2]
    expected[:, :, 2:] = 0.75 * maps[:, :, 2:] + 0.25 * maps.flip(0)[:, :, 2:]
    torch.testing.assert_close(out.dense_logits, expected)
    # DeiT's token target (the global logits) is the mixed image's too, not the unmixed one's
    torch.testing.assert_close(out.global_logits, expected.mean(dim=(2, 3)))
    assert not torch.allclose(out.global_logits, maps.mean(dim=(2, 3)))


def test_a_cached_run_erases_and_mixes_the_students_input_as_an_online_run_does():
    """The cache changes where the teacher's targets come from, nothing else: the same loader
    batch under the same random state gives the student the same erased, mixed images and
    soft labels with and without it."""
    from timm.data.random_erasing import RandomErasing

    maps = torch.randn(4, 3, 4, 4)
    cached = tiny_cache(maps, sizes=torch.full((4, 2), 32), grid=(4, 4))
    batch = {
        "image": torch.rand(4, 3, 32, 32),
        "target": torch.tensor([0, 1, 2, 0]),
        "index": torch.arange(4),
        "crop": torch.tensor([[0, 0, 32, 32]] * 4, dtype=torch.float32),
        "flip": torch.zeros(4, dtype=torch.bool),
    }
    norm = (torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25))

    def prepared(cached_teacher):
        trainer = Trainer(
            distiller=None,
            optimizer=None,
            scheduler=None,
            device=torch.device("cpu"),
            epochs=1,
            steps_per_epoch=1,
            progress_unit="epoch",
            mixup=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, num_classes=3),
            erasing=RandomErasing(probability=1.0, mode="pixel", device="cpu"),
            student_norm=norm,
            cached_teacher=cached_teacher,
        )
        torch.manual_seed(5)
        np.random.seed(5)
        random.seed(5)  # timm's RandomErasing draws its boxes from Python's generator
        return trainer.prepare({key: value.clone() for key, value in batch.items()})

    online_images, online_targets, _ = prepared(None)
    cached_images, cached_targets, teacher_output = prepared(cached)
    torch.testing.assert_close(cached_images, online_images, rtol=0, atol=0)
    torch.testing.assert_close(cached_targets, online_targets, rtol=0, atol=0)
    plain = (batch["image"] - norm[0]) / norm[1]
    mixed_only = (1 - 0.5) * plain + 0.5 * plain.flip(0)  # any mixing of unerased images
    assert not torch.allclose(cached_images, plain) and not torch.allclose(
        cached_images, mixed_only
    )
    assert teacher_output is not None and teacher_output.dense_logits.shape == (4, 3, 4, 4)


# ----------------------------------------------------------------------------- training


class RefusingTeacher(torch.nn.Module):
    def forward(self, images):
        raise AssertionError("the teacher ran although its targets come from the cache")


def test_a_cached_training_step_runs_no_teacher(tiny_run, tmp_path):
    cache = tmp_path / "cache"
    assert build(tiny_run, cache) == 0
    from cskd.method.adapters import wrap_student

    student = wrap_student(
        timm.create_model(
            "deit_tiny_distilled_patch16_224",
            num_classes=4,
            img_size=32,
            patch_size=4,
            embed_dim=32,
            depth=1,
            num_heads=2,
        )
    )
    norm = (torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    distiller = Distiller(
        student,
        RefusingTeacher(),
        ObjectiveWeights(method="cskd"),
        student_norm=norm,
    )
    trainer = Trainer.__new__(Trainer)
    trainer.device, trainer.student_norm, trainer.erasing = torch.device("cpu"), norm, None
    trainer.mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=4)
    trainer.cached_teacher = CachedTeacher(open_cache(cache))
    batch = {
        "image": torch.rand(4, 3, 32, 32),
        "target": torch.arange(4),
        "index": torch.tensor([0, 9, 17, 31]),
        "crop": torch.tensor([[0, 0, 32, 32], [4, 4, 20, 24], [0, 8, 16, 16], [1, 2, 30, 29]]),
        "flip": torch.tensor([False, True, False, True]),
    }
    images, targets, teacher_output = trainer.prepare(batch)
    assert isinstance(teacher_output, TeacherOutput)
    assert teacher_output.dense_logits.shape == (4, 4, 4, 4)
    loss, parts = distiller(images, targets, 0.5, teacher_output)
    loss.backward()
    assert parts["cskd"] > 0 and torch.isfinite(loss)


def test_cskd_and_deit_train_from_a_cache(tiny_run, tmp_path):
    cache = tmp_path / "cache"
    assert build(tiny_run, cache) == 0
    for method in ("cskd", "deit"):
        output = tmp_path / method
        run = cache_args(
            tiny_run,
            cache,
            **{"distill.method": method, "train.output_dir": output, "augment.mixup": 0.8},
        )
        assert main(["train", *run]) == 0
        records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        steps = [record for record in records if record["type"] == "step"]
        assert steps and all(np.isfinite(record["token"]) for record in steps)
        assert (output / "student.safetensors").exists()


def test_a_cache_with_no_teacher_in_use_is_refused(tiny_run, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert build(tiny_run, cache) == 0
    capsys.readouterr()
    assert main(["train", *cache_args(tiny_run, cache, **{"distill.method": "none"})]) == 2
    assert "distill.method=none uses no teacher" in error_line(capsys)


def test_open_cache_names_a_directory_that_is_not_a_cache(tmp_path):
    with pytest.raises(CacheError, match="is not a directory"):
        open_cache(tmp_path / "nowhere")


def test_two_ranks_build_the_same_cache_as_one(tiny_run, tmp_path):
    """Under torchrun each rank builds its shards (r, r + W, ...) and rank 0 the header.

    The ranks run one torch thread each, so the reference is built with one thread too: CPU
    kernels may split their sums differently at another thread count (the last bits of the
    float16 logits then differ)."""
    import os
    import subprocess
    import sys

    one, two = tmp_path / "one", tmp_path / "two"
    args = {"data.eval_batch_size": 8}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert build(tiny_run, one, **args) == 0
    finally:
        torch.set_num_threads(threads)
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "cskd", "cache"]
        + cache_args(tiny_run, two, **args),
        capture_output=True,
        text=True,
        timeout=HANG,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(two)  # printed once, by rank 0
    reference = arrays(one)
    for kind, values in arrays(two).items():
        assert np.array_equal(values, reference[kind]), kind
    header_one = json.loads((one / "cache.json").read_text())
    header_two = json.loads((two / "cache.json").read_text())
    assert [r["files"] for r in header_one["shards"]] == [r["files"] for r in header_two["shards"]]


def test_a_corrupt_photo_stops_the_build_in_one_line_and_the_rerun_completes(tmp_path, capsys):
    from conftest import tiny_overrides
    from photos import photo_folder

    root = photo_folder(tmp_path / "photos", classes=2, train_per_class=6, val_per_class=2)
    torch.manual_seed(0)
    weights = tmp_path / "teacher.pth"
    torch.save(timm.create_model("resnet18", num_classes=2, **TINY_TEACHER).state_dict(), weights)
    cache = tmp_path / "cache"
    run = tiny_overrides(
        tmp_path / "run",
        str(weights),
        **{
            "data.dataset": "folder",
            "data.root": root,
            "data.num_classes": 2,
            "teacher.cache": cache,
            "teacher.cache_shard_size": 4,
            "data.eval_batch_size": 4,
        },
    )
    broken = sorted((root / "train" / "class_1").iterdir())[-1]
    good = broken.read_bytes()
    broken.write_bytes(good[: len(good) // 3])  # a truncated file
    assert main(["cache", *run]) == 2
    line = error_line(capsys)
    assert "corrupt or unreadable image" in line and broken.name in line
    assert not (cache / "cache.json").exists()
    assert (cache / "shard-00000.json").exists()  # the shards before it are kept
    broken.write_bytes(good)
    assert main(["cache", *run]) == 0
    header = json.loads((cache / "cache.json").read_text())
    assert header["images"] == 12 and len(header["shards"]) == 3
    sizes = arrays(cache)["sizes"]
    assert sizes.shape == (12, 2) and len({tuple(size) for size in sizes.tolist()}) > 1
    # each stored size is the original photo's (height, width), in the training set's order
    from PIL import Image

    classes = sorted((root / "train").iterdir())
    files = [path for folder in classes for path in sorted(folder.iterdir())]
    expected = [[Image.open(path).height, Image.open(path).width] for path in files]
    assert any(height != width for height, width in expected)  # a swap would show
    assert sizes.tolist() == expected


# ------------------------------------------------------------ found by the fresh-user review


def test_a_cache_made_with_another_teacher_normalisation_is_refused(tiny_run, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert build(tiny_run, cache) == 0
    capsys.readouterr()
    run = cache_args(tiny_run, cache, **{"teacher.mean": "[0.5, 0.5, 0.5]"})
    assert main(["train", *run]) == 2
    assert "another teacher mean" in error_line(capsys)


def test_a_damaged_header_is_rewritten_by_the_rerun(tiny_run, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert build(tiny_run, cache) == 0
    header = (cache / "cache.json").read_text()
    (cache / "cache.json").write_text(header[: len(header) // 2])
    capsys.readouterr()
    assert main(["train", *cache_args(tiny_run, cache)]) == 2
    assert "is damaged" in error_line(capsys)
    assert build(tiny_run, cache) == 0
    assert json.loads((cache / "cache.json").read_text()) == json.loads(header)
    assert main(["train", *cache_args(tiny_run, cache)]) == 0


def test_a_started_cache_keeps_its_batch_and_a_finished_one_is_a_no_op(tiny_run, tmp_path):
    cache = tmp_path / "cache"
    assert build(tiny_run, cache, **{"data.eval_batch_size": 8}) == 0
    reference = arrays(cache)
    written = {path.name: path.stat().st_mtime_ns for path in cache.iterdir()}
    assert build(tiny_run, cache, **{"data.eval_batch_size": 4}) == 0  # nothing to do
    assert {path.name: path.stat().st_mtime_ns for path in cache.iterdir()} == written
    for path in [cache / "cache.json", *cache.glob("shard-00001*")]:
        path.unlink()
    assert build(tiny_run, cache, **{"data.eval_batch_size": 4}) == 0  # completed at batch 8
    for kind, values in arrays(cache).items():
        assert np.array_equal(values, reference[kind]), kind


def test_a_non_empty_directory_that_is_no_cache_is_refused(tiny_run, tmp_path, capsys):
    directory = tmp_path / "run"
    directory.mkdir()
    (directory / "last.pt").write_bytes(b"a checkpoint")
    assert build(tiny_run, directory) == 2
    assert "non-empty directory that holds no cache" in error_line(capsys)
    assert sorted(path.name for path in directory.iterdir()) == ["last.pt"]


def test_the_rerun_removes_interrupted_writes_and_files_are_readable_by_others(tiny_run, tmp_path):
    cache = tmp_path / "cache"
    assert build(tiny_run, cache) == 0
    (cache / ".shard-00002-logits.npy.abc123.tmp").write_bytes(b"half")
    assert build(tiny_run, cache) == 0
    assert not list(cache.glob(".*.tmp"))
    mode = (cache / "shard-00000-logits.npy").stat().st_mode & 0o777
    assert mode & 0o044, oct(mode)  # group/other may read it (under the usual umask 022)


def test_a_topk_cache_refuses_soft_targets(tiny_run, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert build(tiny_run, cache, **{"teacher.cache_topk": 2}) == 0
    capsys.readouterr()
    for soft in ({"distill.cskd_kind": "soft"}, {"distill.token_kind": "soft"}):
        assert main(["train", *cache_args(tiny_run, cache, **soft)]) == 2
        line = error_line(capsys)
        assert "top-2 logits" in line and "teacher.cache_topk=0" in line


def test_an_unknown_compile_backend_is_one_line(tiny_run, capsys):
    run = tiny_run(**{"train.compile": "true", "train.compile_backend": "nosuch"})
    assert main(["train", *run]) == 2
    assert "train.compile_backend='nosuch' is not a torch.compile backend" in error_line(capsys)
