"""Parts of a training step that a whole-run test would not notice if they broke: the teacher's
own normalisation, random erasing before Mixup, the EMA update, per-epoch augmentation seeds and
drop path reaching the timm model (issue 11, "tests that would not notice a broken step")."""

from __future__ import annotations

import pytest
import torch

from cskd.cli import main
from cskd.config import load_config
from cskd.data.sampling import EpochSampler
from cskd.errors import TeacherError
from cskd.method.distiller import normalizer
from cskd.training.engine import Trainer
from cskd.training.models import build_student


def test_the_teacher_owns_its_normalisation_and_renormalises_the_students_input():
    import timm

    from cskd.method.adapters import DenseTeacher

    model = timm.create_model("resnet18", pretrained=False, num_classes=3, channels=[8, 8, 8, 8])
    teacher = DenseTeacher(model, mean=(0.6, 0.5, 0.4), std=(0.2, 0.25, 0.3), check_size=32)
    pixels = torch.rand(2, 3, 4, 4)
    mean_t = torch.tensor([0.6, 0.5, 0.4]).view(1, 3, 1, 1)
    std_t = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    expected = (pixels - mean_t) / std_t
    torch.testing.assert_close(teacher.normalize(pixels), expected)
    mean_s, std_s = normalizer((0.2, 0.3, 0.4), (0.5, 0.6, 0.7), torch.device("cpu"))
    student_images = (pixels - mean_s) / std_s
    torch.testing.assert_close(
        teacher.renormalize(student_images, mean=mean_s, std=std_s), expected
    )
    # by default its timm configuration's (as timm's DistillationTeacher); a wrong length is one line
    default = DenseTeacher(model, check_size=32)
    assert default.input_mean.flatten().tolist() == pytest.approx(model.pretrained_cfg["mean"])
    with pytest.raises(TeacherError, match="set teacher.mean and teacher.std to 3 value"):
        DenseTeacher(model, mean=(0.5,), std=(0.5,), check_size=32)


def test_the_teacher_grid_is_probed_once_per_size():
    import timm

    from cskd.method.adapters import DenseTeacher

    model = timm.create_model("resnet18", pretrained=False, num_classes=3, channels=[8, 8, 8, 8])
    teacher = DenseTeacher(model, check_size=32)
    calls = []
    original = teacher.forward
    teacher.forward = lambda images: (calls.append(images.shape), original(images))[1]
    assert teacher.grid(64) == (2, 2) and teacher.grid(64) == (2, 2)
    assert teacher.grid(128) == (4, 4)
    assert len(calls) == 2


def test_distiller_gives_the_teacher_its_own_normalisation(tiny_run):
    from cskd.training.build import build_distiller
    from cskd.training.models import build_teacher

    config = load_config(
        None,
        tiny_run(
            **{
                "data.mean": [0.2, 0.3, 0.4],
                "data.std": [0.5, 0.6, 0.7],
                "teacher.mean": [0.6, 0.5, 0.4],
                "teacher.std": [0.2, 0.25, 0.3],
            }
        ),
    )
    device = torch.device("cpu")
    student, teacher = build_student(config), build_teacher(config)
    received = []
    original = teacher.forward
    teacher.forward = lambda images: (received.append(images), original(images))[1]
    distiller = build_distiller(config, student, teacher, device=device, mixup=False)
    pixels = torch.rand(2, 3, 32, 32)
    mean_s, std_s = normalizer(config.data.mean, config.data.std, device)
    mean_t, std_t = normalizer(config.teacher.mean, config.teacher.std, device)
    distiller((pixels - mean_s) / std_s, torch.tensor([0, 1]), 0.0)
    torch.testing.assert_close(received[0], (pixels - mean_t) / std_t, atol=1e-5, rtol=1e-5)


def test_random_erasing_runs_before_mixup_on_the_normalised_batch():
    calls = []

    def erasing(images):
        calls.append(("erasing", images.clone()))
        return images * 0 + 7.0

    def mixup(images, targets):
        calls.append(("mixup", images.clone()))
        return images, targets

    trainer = Trainer.__new__(Trainer)  # only prepare() is exercised
    trainer.device = torch.device("cpu")
    trainer.student_norm = normalizer((0.5,), (0.25,), torch.device("cpu"))
    trainer.erasing, trainer.mixup = erasing, mixup
    pixels = torch.rand(2, 1, 4, 4)
    images, _, _ = trainer.prepare({"image": pixels, "target": torch.tensor([0, 1])})
    assert [name for name, _ in calls] == ["erasing", "mixup"]
    torch.testing.assert_close(calls[0][1], (pixels - 0.5) / 0.25)  # erasing sees normalised
    assert (calls[1][1] == 7.0).all()  # Mixup sees the erased batch
    assert (images == 7.0).all()


def test_the_ema_moves_towards_the_trained_weights(tmp_path, tiny_run):
    overrides = {"train.ema_decay": 0.5, "optim.epochs": 1, "optim.warmup_epochs": 0}
    assert main(["train", *tiny_run(**overrides)]) == 0
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    config = load_config(None, tiny_run(**overrides))
    torch.manual_seed(config.train.seed)
    initial = build_student(config).state_dict()
    ema, trained = checkpoint["ema"], checkpoint["student"]
    key = "blocks.0.attn.qkv.weight"
    assert not torch.equal(ema[key], initial[key]), "the EMA never left the initial weights"
    assert not torch.equal(ema[key], trained[key])
    # with decay 0.5 over 4 steps the EMA sits between the start and the end, nearer the end
    assert (ema[key] - trained[key]).norm() < (initial[key] - trained[key]).norm()


def test_augmentation_seeds_change_with_the_epoch():
    sampler = EpochSampler(list(range(16)), seed=0, rank=0, world_size=1)
    sampler.set_epoch(0)
    first = dict(iter(sampler))
    sampler.set_epoch(1)
    second = dict(iter(sampler))
    assert set(first) == set(second) == set(range(16))
    assert all(first[index] != second[index] for index in first)  # new crops every epoch
    sampler.set_epoch(0)
    assert dict(iter(sampler)) == first  # and the same ones again for the same epoch


@pytest.mark.parametrize("rate", [0.0, 0.25])
def test_drop_path_reaches_the_timm_model(tiny_run, rate):
    config = load_config(None, tiny_run(**{"student.drop_path": rate}))
    student = build_student(config)
    rates = [
        block.drop_path1.drop_prob if hasattr(block.drop_path1, "drop_prob") else 0.0
        for block in student.model.blocks
    ]
    assert rates[-1] == pytest.approx(rate)  # timm spreads it linearly over the blocks
    assert rates[0] == 0.0


def test_place_teacher_makes_it_channels_last_and_compiles_it_with_the_student(tiny_run):
    from cskd.config import load_config
    from cskd.training.models import build_teacher, place_teacher

    images = torch.randn(2, 3, 32, 32)
    plain = load_config(None, tiny_run(**{"teacher.memory_format": "contiguous"}))
    reference = place_teacher(plain, build_teacher(plain), torch.device("cpu"))
    assert not reference.channels_last and reference._compiled_call_impl is None
    fast = load_config(
        None,
        tiny_run(
            **{
                "teacher.memory_format": "channels_last",
                "train.compile": "true",
                "train.compile_backend": "eager",  # dynamo's tracing without code generation
            }
        ),
    )
    teacher = place_teacher(fast, build_teacher(fast), torch.device("cpu"))
    assert teacher.channels_last and teacher._compiled_call_impl is not None
    conv = next(m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    expected, got = reference(images), teacher(images)
    torch.testing.assert_close(got.dense_logits, expected.dense_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.global_logits, expected.global_logits, atol=1e-5, rtol=1e-5)


def test_a_compiled_run_trains(tiny_run):
    from cskd.cli import main

    overrides = {"train.compile": "true", "train.compile_backend": "eager", "optim.epochs": 1}
    assert main(["train", *tiny_run(**overrides), "train.max_steps_per_epoch=2"]) == 0


def test_the_teacher_is_compiled_once_after_the_preflight(tiny_run, monkeypatch):
    """The pre-flight's batches have other shapes than training's: compiling the teacher before
    them cost one compile per shape (80 s each on a CPU)."""
    import cskd.training.preflight
    import cskd.training.run
    from cskd.method.adapters import DenseTeacher

    events = []
    check_run = cskd.training.preflight.check_run
    monkeypatch.setattr(
        cskd.training.preflight,
        "check_run",
        lambda *args, **kwargs: (events.append("pre-flight"), check_run(*args, **kwargs))[1],
    )
    monkeypatch.setattr(DenseTeacher, "compile", lambda self, **kwargs: events.append("compile"))
    overrides = {"train.compile": "true", "train.compile_backend": "eager"}
    assert main(["train", *tiny_run(**overrides, **{"train.stop_after_steps": 1})]) == 0
    assert events == ["pre-flight", "compile"], events
