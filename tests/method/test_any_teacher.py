"""Any timm classifier teaches under ``deit``; under ``cskd`` every one whose head is affine
after global average pooling (linear or 1x1-conv, NCHW or channels-last maps), the others
refused in one line (issue 20)."""

from __future__ import annotations

import pytest
import timm
import torch

from cskd.config import load_config
from cskd.errors import TeacherError
from cskd.training.models import build_teacher

SWIN = {"img_size": 64, "window_size": 4, "embed_dim": 32, "depths": [1, 1], "num_heads": [1, 2]}
DENSE = {  # heads affine after pooling: dense logits whose mean is the model's output
    "resnetv2_50x1_bit": {},  # 1x1-conv head (BiT)
    "dla34": {},  # 1x1-conv head
    "dpn68": {},  # 1x1-conv head
    "swin_tiny_patch4_window7_224": SWIN,  # channels-last map, norm inside the features
    "tresnet_m": {},  # space-to-depth stem: its first conv reads 16 x the input channels
    "resnet18": {"channels": [8, 16, 32, 64], "output_stride": 8},
}
GLOBAL_ONLY = {  # something that is not affine between pooling and the logits
    "mobilenetv3_small_050": "conv_head",
    "ghostnet_050": "conv_head",
    "hgnetv2_b0": "head",
    "efficientvit_b0": "head",
    "inception_next_tiny": "head",
    "convnext_atto": "head",
    "mambaout_femto": "head",
}


def _config(name: str, kwargs: dict, tmp_path) -> object:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=4, in_chans=1, **kwargs)
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    values = {
        "teacher.name": name,
        "teacher.checkpoint": path,
        "teacher.kwargs": str(kwargs).replace("'", ""),
        "teacher.mean": "[0.5]",
        "teacher.std": "[0.5]",
        "data.in_chans": 1,
        "data.mean": "[0.5]",
        "data.std": "[0.5]",
        "data.num_classes": 4,
        "data.image_size": 64,
        "student.kwargs": "{img_size: 64, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
    }
    return load_config(None, [f"{key}={value}" for key, value in values.items()]), model.eval()


@pytest.mark.parametrize("name", sorted(DENSE))
def test_a_teacher_with_an_affine_head_gives_dense_logits_of_any_layout(name, tmp_path):
    config, model = _config(name, DENSE[name], tmp_path)
    teacher = build_teacher(config, method="cskd")
    assert teacher.in_chans == 1, "the input channels come from the model's configuration"
    pixels = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    output = teacher(teacher.normalize(pixels))
    with torch.no_grad():
        expected = model((pixels - 0.5) / 0.5)
    torch.testing.assert_close(output.global_logits, expected, rtol=1e-4, atol=1e-4)
    dense = output.dense_logits
    assert dense.shape[:2] == (2, 4) and dense.shape[-2:] == teacher.grid(64)
    torch.testing.assert_close(dense.mean(dim=(2, 3)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(GLOBAL_ONLY))
def test_any_classifier_teaches_deit_and_others_are_refused_for_cskd_in_one_line(name, tmp_path):
    config, model = _config(name, {}, tmp_path)
    teacher = build_teacher(config, method="deit")
    assert teacher.global_only and teacher.in_chans == 1
    pixels = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model((pixels - 0.5) / 0.5)
    torch.testing.assert_close(teacher(teacher.normalize(pixels)).global_logits, expected)
    with pytest.raises(TeacherError) as refused:
        build_teacher(config, method="cskd")
    message = str(refused.value)
    assert "\n" not in message and "distill.method=deit" in message, message
    assert name in message and GLOBAL_ONLY[name] in message, message


@pytest.mark.parametrize("name", ["coat_tiny", "crossvit_tiny_240"])
def test_a_teacher_with_several_feature_streams_is_refused_under_cskd_in_one_line(name):
    """Found by benchmarks/families.py: CoaT and CrossViT end in a list of streams, which the
    dense check read as a tensor (AttributeError); now one TeacherError naming the way out."""
    import timm

    from cskd.errors import TeacherError
    from cskd.method.adapters import DenseTeacher

    model = timm.create_model(name, num_classes=4)
    size = model.pretrained_cfg["input_size"][-1]
    with pytest.raises(TeacherError, match=r"several streams.*distill.method=deit"):
        DenseTeacher(model, check_size=size, in_chans=3)
    assert DenseTeacher(model, check_size=size, in_chans=3, global_only=True).global_only


def test_the_grid_probe_runs_a_group_norm_teacher_whose_map_is_one_cell():
    """Found by a user's check: BiT (GroupNorm) at 32 px has a 1 x 1 map, and GroupNorm refuses
    one value per group, so the one-image grid probe raised a traceback."""
    import timm

    from cskd.method.adapters import DenseTeacher

    model = timm.create_model("resnetv2_50x1_bit", num_classes=4, channels=[128, 128, 128, 128])
    teacher = DenseTeacher(model, check_size=32, in_chans=3)
    assert teacher.grid(32) == (1, 1)
