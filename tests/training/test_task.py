"""``CSKDTask``: CSKD inside a user's own loop, as a timm training task."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import TINY_STUDENT, TINY_TEACHER
from timm.data import Mixup

from cskd import CSKDTask, Distiller, ObjectiveWeights
from cskd.errors import ConfigError, GridError
from cskd.method.adapters import DenseStudent, DenseTeacher, MapStudent, PlainClassifier
from cskd.method.distiller import normalizer

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # the student's normalisation (not the teacher's)


def student_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, num_classes=4, **TINY_STUDENT
    )


def make_task(teacher_checkpoint, **options) -> CSKDTask:
    options = {"epochs": 2, "steps_per_epoch": 3, "progress": "step", **options}
    return CSKDTask(
        student_model(),
        "resnet18",
        teacher_checkpoint=teacher_checkpoint,
        teacher_kwargs=TINY_TEACHER,
        student_mean=MEAN,
        student_std=STD,
        **options,
    )


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(8, 3, 32, 32, generator=generator)
    mean, std = normalizer(MEAN, STD, "cpu")
    return (pixels - mean) / std, torch.arange(8) % 4


def test_a_plain_loop_with_timm_mixup_trains_the_student_and_never_the_teacher(
    teacher_checkpoint,
):
    task = make_task(teacher_checkpoint).train()
    teacher_before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in task.trainable_module.state_dict().items()}
    optimizer = torch.optim.AdamW(task.get_trainable_module().parameters(), lr=1e-2)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=4)
    weights = []
    for step in range(4):
        images, labels = batch(step)
        images, targets = mixup(images, labels)  # (8, 4) soft targets: the teacher sees the mix
        result = task(images, targets)
        optimizer.zero_grad()
        result["loss"].backward()
        optimizer.step()
        assert set(result) == {"loss", "output", "base", "token", "cskd", "local_weight"}
        assert result["output"].shape == (8, 4) and torch.isfinite(result["loss"])
        weights.append(result["local_weight"].item())
    # a(t) = 1 - t with t counted by the task: 0, 1, 2, 3 steps of 6
    assert weights == pytest.approx([1.0, 5 / 6, 4 / 6, 3 / 6])
    assert all(torch.equal(v, task.teacher.state_dict()[k]) for k, v in teacher_before.items())
    after = task.trainable_module.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in student_before.items())
    assert not any(p.requires_grad for p in task.teacher.parameters())


def test_the_task_loss_is_the_trainers_distiller_loss_at_the_same_progress(teacher_checkpoint):
    """The trainer's Distiller, fed t by hand, and the task, counting t itself, agree exactly."""
    task = make_task(teacher_checkpoint, grad_accum_steps=2).train()
    distiller = Distiller(
        task.trainable_module,
        task.teacher,
        ObjectiveWeights(),
        student_norm=normalizer(MEAN, STD, "cpu"),
    )
    for call in range(6):
        images, labels = batch(call)
        expected, parts = distiller(images, labels, (call // 2) / 6)  # 2 calls per step
        got = task(images, labels)
        assert torch.equal(got["loss"], expected), call
        assert got["local_weight"].item() == pytest.approx(parts["local_weight"])
    # a loop that evaluates with the task (eval mode) does not advance the schedule
    task.eval()
    task(*batch(9))
    assert int(task.calls) == 6 and float(task.progress) == pytest.approx(3 / 6)


def test_checkpoint_state_round_trip_keeps_the_weights_and_the_schedule(teacher_checkpoint):
    task = make_task(teacher_checkpoint, progress="epoch").train()
    task.setup_ema(decay=0.5)
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.1)
    for step in range(4):
        task(*batch(step))["loss"].backward()
        optimizer.step()
        task.update_ema()
    state = task.get_checkpoint_state()
    ema_state = task.get_checkpoint_state(ema=True)
    assert state["task_state"]["calls"] == 4 and float(task.progress) == pytest.approx(1 / 2)
    # the saved weights are the timm model's: they load into timm.create_model directly
    plain = student_model()
    plain.load_state_dict(state["state_dict"])
    assert not any(key.startswith(("student.", "model.")) for key in state["state_dict"])

    resumed = make_task(teacher_checkpoint, progress="epoch")
    resumed.setup_ema(decay=0.5)
    resumed.load_checkpoint_state(state["state_dict"], state["task_state"])
    resumed.load_checkpoint_state(
        ema_state["state_dict_ema"], ema_state["task_state_ema"], ema=True
    )
    assert int(resumed.calls) == 4 and float(resumed.progress) == float(task.progress)
    images, labels = batch(7)
    task.eval(), resumed.eval()
    assert torch.equal(task(images, labels)["loss"], resumed(images, labels)["loss"])
    for ema in (False, True):  # the evaluators' models: (N, K) logits under the saved rule
        logits = resumed.get_eval_model(ema=ema)(images)
        assert torch.equal(logits, task.get_eval_model(ema=ema)(images))
        assert logits.shape == (8, 4)
    student = resumed.trainable_module
    assert torch.allclose(resumed.get_eval_model()(images), student.predict(images))


def test_the_student_and_the_distiller_save_and_load_alike_when_nested(teacher_checkpoint):
    """A DenseStudent's keys are its timm model's at the top and nested alike (the task holds it
    inside), and a Distiller's state dict holds the student only, not the frozen teacher."""
    student = DenseStudent(student_model())
    nested = torch.nn.Sequential(student)
    keys = list(nested.state_dict())
    assert keys[0] == "0.cls_token" and all(k.startswith("0.") for k in keys)
    assert not nested.load_state_dict(nested.state_dict()).missing_keys
    teacher = DenseTeacher(
        timm.create_model("resnet18", num_classes=4, **TINY_TEACHER), check_size=32
    )
    distiller = Distiller(
        student, teacher, ObjectiveWeights(), student_norm=normalizer(MEAN, STD, "cpu")
    )
    state = distiller.state_dict()
    assert state and all(key.startswith("student.") for key in state)
    result = distiller.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys


def test_what_the_task_cannot_serve_is_refused_in_one_line(teacher_checkpoint):
    common = {"teacher_checkpoint": teacher_checkpoint, "teacher_kwargs": TINY_TEACHER}
    common.update(epochs=1, steps_per_epoch=1, image_size=32)
    xcit = timm.create_model(
        "xcit_nano_12_p16_224", img_size=32, embed_dim=32, depth=1, num_heads=2
    )
    with pytest.raises(ConfigError, match=r"Xcit cannot be a CSKD student: .*no fixed patch grid"):
        CSKDTask(xcit, "resnet18", **common)
    pit = timm.create_model("pit_ti_224", img_size=32, num_classes=4)
    with pytest.raises(ConfigError, match=r"not an H x W map; .*method=\"deit\""):
        CSKDTask(pit, "resnet18", **common)
    with pytest.raises(ConfigError, match="progress='batch'"):
        make_task(teacher_checkpoint, progress="batch")
    # a CNN: a MapStudent under cskd (the teacher a timm model given as such), plain under deit
    cnn = timm.create_model("resnet18", num_classes=4, **TINY_TEACHER)
    teacher = timm.create_model("resnet18", num_classes=4, **TINY_TEACHER)
    dense = CSKDTask(cnn, teacher, epochs=1, steps_per_epoch=1, image_size=32)
    assert isinstance(dense.trainable_module, MapStudent)
    assert set(dense(*batch())) == {"loss", "output", "base", "token", "cskd", "local_weight"}
    plain = CSKDTask(
        cnn, teacher, weights=ObjectiveWeights(method="deit"), epochs=1, steps_per_epoch=1
    )
    assert isinstance(plain.trainable_module, PlainClassifier)
    assert set(plain(*batch())) == {"loss", "output", "base", "token"}


def test_the_compiled_task_gives_the_same_losses_in_at_most_two_graphs(teacher_checkpoint):
    """torch.compile of the whole task over a dozen steps: the progress is a tensor, so a(t)
    moving every step compiles nothing again; and task.compile() compiles each model once."""
    import torch._dynamo

    reference = make_task(teacher_checkpoint, epochs=2, steps_per_epoch=6).train()
    task = make_task(teacher_checkpoint, epochs=2, steps_per_epoch=6).train()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(task, backend="eager")
    for step in range(12):
        images, labels = batch(step)
        got, expected = compiled(images, labels), reference(images, labels)
        assert torch.allclose(got["loss"], expected["loss"]), step
        assert got["local_weight"].item() == pytest.approx(1 - step / 12), step
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 2, graphs
    assert int(task.calls) == 12

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    task = make_task(teacher_checkpoint).train()
    task.compile(backend="eager")
    for step in range(3):
        task(*batch(step))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs == 2, graphs  # the student and the teacher, once each over three steps


def test_an_encoder_or_a_teacher_of_other_classes_is_refused_in_one_line(teacher_checkpoint):
    """Found by a user's check: a head-less encoder under deit/none, and a teacher module of
    another class count, reached the first step's cross-entropy as tracebacks."""
    encoder = timm.create_model("resnet18", num_classes=0, **TINY_TEACHER)
    for method in ("none", "deit"):
        with pytest.raises(ConfigError, match=r"cannot be a student: it has no classifier head"):
            CSKDTask(
                encoder,
                timm.create_model("resnet18", num_classes=4, **TINY_TEACHER),
                weights=ObjectiveWeights(method=method),
                epochs=1,
                steps_per_epoch=1,
                image_size=32,
            )
    ten = timm.create_model("resnet18", num_classes=10, **TINY_TEACHER)
    with pytest.raises(ConfigError, match=r"gives 10 classes and the student 4"):
        CSKDTask(student_model(), ten, epochs=1, steps_per_epoch=1)


def test_a_headless_teacher_or_a_too_coarse_student_map_is_named_at_construction():
    """A teacher built with num_classes=0 is named an encoder (not "0 classes"); a map student
    coarser than the teacher's map is refused when the task is built, not at the first step."""
    headless = timm.create_model("resnet18", num_classes=0, **TINY_TEACHER)
    with pytest.raises(ConfigError, match=r"the teacher ResNet has no classifier head .*encoder"):
        CSKDTask(student_model(), headless, epochs=1, steps_per_epoch=1)
    coarse = timm.create_model("resnet18", num_classes=4, channels=[8, 16, 32, 64])  # stride 32
    teacher = timm.create_model("resnet18", num_classes=4, **TINY_TEACHER)  # a 4 x 4 map
    with pytest.raises(GridError, match=r"student map 1x1 \(ResNet's final feature map at 32 px"):
        CSKDTask(coarse, teacher, epochs=1, steps_per_epoch=1, image_size=32)
    patches = timm.create_model(
        "deit_tiny_distilled_patch16_224", num_classes=4, **{**TINY_STUDENT, "patch_size": 16}
    )
    with pytest.raises(GridError, match=r"student grid 2x2 is smaller than the teacher grid 4x4"):
        CSKDTask(patches, teacher, epochs=1, steps_per_epoch=1)
    # under deit only the global answers meet: both coarse students are served
    deit = ObjectiveWeights(method="deit")
    for student in (coarse, patches):
        CSKDTask(student, teacher, weights=deit, epochs=1, steps_per_epoch=1, image_size=32)


def test_the_grid_check_uses_the_size_the_student_runs_at():
    """A ViT with dynamic_img_size built at 32 px and run at 64 has an 8 x 8 grid there: it is
    served; a global-only teacher under cskd is refused in one line."""
    dynamic = timm.create_model(
        "deit_tiny_distilled_patch16_224",
        num_classes=4,
        **{**TINY_STUDENT, "patch_size": 8, "dynamic_img_size": True},  # 4 x 4 at 32 px
    )
    teacher = timm.create_model("resnet18", num_classes=4, **TINY_TEACHER)  # 8 x 8 at 64 px
    task = CSKDTask(dynamic, teacher, epochs=1, steps_per_epoch=1, image_size=64)
    assert task.trainable_module.grid(64) == (8, 8) and task.trainable_module.grid(32) == (4, 4)
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    assert torch.isfinite(task(images, labels)["cskd"])
    global_only = DenseTeacher(teacher, check_size=64, global_only=True)
    with pytest.raises(ConfigError, match=r"global_only=True.*gives no dense logits"):
        CSKDTask(dynamic, global_only, epochs=1, steps_per_epoch=1, image_size=64)


def test_a_map_student_too_coarse_at_run_time_is_named_as_a_map():
    """Run on smaller images than it was checked at, a map student's error names its map."""
    cnn = MapStudent(timm.create_model("resnet18", num_classes=4, **TINY_TEACHER))
    with pytest.raises(GridError, match=r"student map 1x1 \(.*final feature map\) is smaller"):
        cnn(torch.randn(2, 3, 8, 8), output_grid=(4, 4))  # the teacher's map at 32 px


def test_probing_a_map_students_grid_moves_no_batch_norm_statistics():
    """The grid probe (pre-flight, task construction) runs the student in eval mode: a training
    student's batch-norm running statistics are those of the training batches only."""
    cnn = timm.create_model("resnet18", num_classes=4, **TINY_TEACHER).train()
    before = {k: v.clone() for k, v in cnn.state_dict().items() if "running" in k}
    student = MapStudent(cnn)
    assert student.grid(32) == (4, 4) and student.model.training
    from cskd.method.adapters import map_student_problem

    assert map_student_problem(cnn, 32, in_chans=3) is None and cnn.training
    after = {k: v for k, v in cnn.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
