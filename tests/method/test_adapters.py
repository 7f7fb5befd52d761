import contextlib

import pytest
import timm
import torch
from safetensors.torch import save_file

from cskd.errors import CheckpointError, TeacherError
from cskd.method.adapters import DenseStudent, DenseTeacher, combine_heads
from cskd.training.models import load_teacher

TEACHERS = [
    ("resnet18", dict(channels=(8, 16, 32, 64))),
    ("regnetx_002", dict()),
    ("efficientnet_b0", dict()),
]
TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2)
STUDENTS = [
    "deit_tiny_distilled_patch16_224",  # class + distillation tokens
    "vit_tiny_patch16_224",  # class token only
    "vit_base_patch16_reg4_gap_256",  # 4 register tokens, no class token, average pooling
]


@pytest.mark.parametrize("name, kwargs", TEACHERS)
def test_teacher_global_logits_are_the_models_output_and_the_dense_mean(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=7, **kwargs).eval()
    torch.nn.init.normal_(model.get_classifier().bias)  # a bias the dense head must carry
    assert model.get_classifier().bias.abs().min() > 0
    teacher = DenseTeacher(model)
    images = torch.randn(2, 3, 96, 96)
    out = teacher(images)
    with torch.no_grad():
        reference = model(images)
    torch.testing.assert_close(out.global_logits, reference)
    assert out.dense_logits.shape == (2, 7, 3, 3)
    torch.testing.assert_close(out.dense_logits.mean(dim=(2, 3)), reference, atol=1e-5, rtol=1e-4)


def test_teacher_is_frozen_and_stays_in_eval_mode():
    model = timm.create_model("resnet18", pretrained=False, num_classes=3, channels=(8, 16, 32, 64))
    teacher = DenseTeacher(model)
    parent = torch.nn.Sequential(teacher)
    parent.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    out = teacher(torch.randn(1, 3, 64, 64, requires_grad=True))
    assert not out.dense_logits.requires_grad and not out.global_logits.requires_grad


def test_teacher_with_norm_after_pooling_is_refused():
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=5)
    with pytest.raises(TeacherError, match="teacher convnext_atto: its head .* is not affine"):
        DenseTeacher(model, name="convnext_atto")


def _teacher_weights(num_classes=4):
    torch.manual_seed(1)
    model = timm.create_model(
        "resnet18", pretrained=False, num_classes=num_classes, channels=(8, 16, 32, 64)
    )
    return model.state_dict()


@pytest.mark.parametrize("form", ["safetensors", "state_dict", "model_entry"])
def test_load_teacher_reads_each_checkpoint_format(tmp_path, form):
    state = _teacher_weights()
    if form == "safetensors":
        path = tmp_path / "teacher.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "teacher.pth"
        torch.save(state if form == "state_dict" else {"model": state, "epoch": 3}, path)
    teacher = load_teacher("resnet18", path, num_classes=4, channels=(8, 16, 32, 64))
    for key, value in state.items():
        torch.testing.assert_close(teacher.model.state_dict()[key], value)


def test_load_teacher_names_the_mismatch(tmp_path):
    path = tmp_path / "teacher.pth"
    torch.save(_teacher_weights(num_classes=4), path)
    with pytest.raises(CheckpointError, match=r"fc.weight \(4, 64\) vs \(10, 64\)"):
        load_teacher("resnet18", path, num_classes=10, channels=(8, 16, 32, 64))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_teacher("resnet18", tmp_path / "missing.pth", num_classes=4)
    with pytest.raises(TeacherError, match="no weights"):
        load_teacher("resnet18", None, num_classes=4)


def _final_tokens(model, images):
    """Prefix and patch tokens after the final norm, through timm's forward_intermediates."""
    patches, prefix = model.forward_intermediates(
        images,
        indices=1,
        norm=True,
        output_fmt="NLC",
        return_prefix_tokens=True,
        intermediates_only=True,
    )[0]
    return prefix, patches


@pytest.mark.parametrize("name", STUDENTS)
@pytest.mark.parametrize("img_size, patch_size", [(32, 8), (48, 8), (32, 4), (48, 16)])
def test_student_heads_equal_timms_own_heads(name, img_size, patch_size):
    torch.manual_seed(0)
    model = timm.create_model(
        name, pretrained=False, num_classes=6, img_size=img_size, patch_size=patch_size, **TINY_VIT
    ).eval()
    student = DenseStudent(model)
    side = img_size // patch_size
    assert student.grid_size == (side, side)
    images = torch.randn(2, 3, img_size, img_size)
    out = student(images)
    with torch.no_grad():
        reference = model(images)
        _, patches = _final_tokens(model, images)
    assert out.patch_logits.shape == (2, side * side, 6) and out.patch_grid == (side, side)
    torch.testing.assert_close(combine_heads(out, "cls+dist"), reference)
    head = model.head_dist if student.distilled else model.head
    torch.testing.assert_close(out.patch_logits, head(model.fc_norm(patches)))
    if student.distilled:
        model.set_distilled_training(True)
        model.train()
        cls, dist = model(images)
        out = student.train()(images)
        torch.testing.assert_close(out.cls_logits, cls)
        torch.testing.assert_close(out.dist_logits, dist)
    else:
        assert out.dist_logits is None
        torch.testing.assert_close(out.cls_logits, reference)


def test_student_pools_tokens_before_the_head_to_the_teacher_grid():
    torch.manual_seed(0)
    model = timm.create_model(
        STUDENTS[0], pretrained=False, num_classes=5, img_size=56, patch_size=4, **TINY_VIT
    ).eval()
    student = DenseStudent(model)
    images = torch.randn(2, 3, 56, 56)
    full = student(images).patch_logits.reshape(2, 14, 14, 5)
    pooled = student(images, output_grid=(7, 7))
    expected = full.reshape(2, 7, 2, 7, 2, 5).mean(dim=(2, 4)).reshape(2, 49, 5)
    assert pooled.patch_grid == (7, 7)
    torch.testing.assert_close(pooled.patch_logits, expected, atol=1e-5, rtol=1e-4)


def test_student_adds_no_parameters_and_its_state_dict_loads_into_plain_timm():
    kwargs = dict(pretrained=False, num_classes=5, img_size=32, patch_size=8, **TINY_VIT)
    model = timm.create_model(STUDENTS[0], **kwargs)
    student = DenseStudent(model)
    assert sum(p.numel() for p in student.parameters()) == sum(
        p.numel() for p in model.parameters()
    )
    plain = timm.create_model(STUDENTS[0], **kwargs)
    plain.load_state_dict(student.state_dict())
    images = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(
        plain.eval()(images), combine_heads(student.eval()(images), "cls+dist")
    )


def test_inference_rules():
    from cskd.method.adapters import StudentOutput

    out = StudentOutput(
        cls_logits=torch.tensor([[3.0, 0.0]]),
        dist_logits=torch.tensor([[0.0, 3.0]]),
        patch_logits=torch.tensor([[[0.0, 0.0], [6.0, 0.0]]]),
        patch_grid=(1, 2),
    )
    torch.testing.assert_close(combine_heads(out, "cls"), torch.tensor([[3.0, 0.0]]))
    torch.testing.assert_close(combine_heads(out, "cls+dist"), torch.tensor([[1.5, 1.5]]))
    torch.testing.assert_close(combine_heads(out, "cls+dist+patch"), torch.tensor([[2.0, 1.0]]))
    with pytest.raises(ValueError, match="unknown inference rule"):
        combine_heads(out, "mean")


def test_predict_applies_the_named_inference_rule():
    torch.manual_seed(0)
    kwargs = dict(pretrained=False, num_classes=5, img_size=32, patch_size=8, **TINY_VIT)
    model = timm.create_model(STUDENTS[0], **kwargs).eval()
    images = torch.randn(2, 3, 32, 32)
    for rule in ["cls", "cls+dist", "cls+dist+patch"]:
        student = DenseStudent(model, inference_rule=rule)
        expected = combine_heads(student(images), rule)
        torch.testing.assert_close(student.predict(images), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown inference rule"):
        DenseStudent(model, inference_rule="all")


@pytest.mark.parametrize(
    ("teacher_dtype", "outer", "expected"),
    [
        (None, torch.bfloat16, torch.bfloat16),  # no setting: the caller's autocast
        (torch.float16, torch.bfloat16, torch.float16),  # fp16 teacher inside a bf16 step
        (torch.float32, torch.bfloat16, torch.float32),  # fp32 teacher inside a bf16 step
        (torch.bfloat16, None, torch.bfloat16),
    ],
)
def test_teacher_runs_at_its_own_precision_whatever_the_callers(teacher_dtype, outer, expected):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=5, channels=[8, 16, 32, 64])
    teacher = DenseTeacher(model, amp_dtype=teacher_dtype)
    images = torch.randn(2, 3, 32, 32)
    context = torch.autocast("cpu", dtype=outer) if outer else contextlib.nullcontext()
    with context:
        output = teacher(images)
    assert output.dense_logits.dtype == output.global_logits.dtype == expected
    reference = DenseTeacher(model)(images)  # fp32
    torch.testing.assert_close(
        output.global_logits.float(), reference.global_logits, atol=0.1, rtol=0.05
    )
