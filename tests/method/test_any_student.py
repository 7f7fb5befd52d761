"""Every timm ViT-family student works or is refused in one line before anything is built, with
the real cause (issue 20)."""

from __future__ import annotations

import pytest

from cskd.cli import main
from cskd.config import load_config
from cskd.method.adapters import DenseStudent, PlainClassifier
from cskd.training.models import build_student

CASES = {
    "xcit": (
        "xcit_nano_12_p16_224",
        "{img_size: 64, embed_dim: 32, depth: 1, num_heads: 2}",
        "has no fixed patch grid",
    ),
    "mvitv2": ("mvitv2_tiny", "{}", "has no fixed patch grid"),
    "convit": (
        "convit_tiny",
        "{img_size: 64, depth: 2}",
        "joins only after block 10",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_vit_without_patch_logits_is_refused_under_cskd_in_one_line(case, tmp_path, capsys):
    name, kwargs, cause = CASES[case]
    arguments = ["config", f"student.name={name}", f"student.kwargs={kwargs}"]
    arguments += ["data.image_size=64", "distill.method=cskd"]
    assert main(arguments) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert f"student.name={name}" in err[0] and cause in err[0], err[0]
    assert "distill.method=deit" in err[0], err[0]


def test_such_a_vit_trains_as_a_plain_classifier_under_deit_and_a_full_convit_is_dense():
    xcit, kwargs, _ = CASES["xcit"]
    overrides = [f"student.name={xcit}", f"student.kwargs={kwargs}", "data.image_size=64"]
    student = build_student(load_config(None, [*overrides, "distill.method=deit"]))
    assert isinstance(student, PlainClassifier)
    overrides = ["student.name=convit_tiny", "student.kwargs={img_size: 64, depth: 11}"]
    student = build_student(load_config(None, [*overrides, "data.image_size=64"]))
    assert isinstance(student, DenseStudent) and student.grid_size == (4, 4)


def test_a_student_without_a_classifier_is_refused_for_every_method(capsys):
    for method in ("none", "deit", "cskd"):
        arguments = ["config", "student.kwargs={img_size: 64, num_classes: 0}"]
        arguments += ["data.image_size=64", f"distill.method={method}"]
        assert main(arguments) == 2, method
        line = capsys.readouterr().err.strip()
        assert "\n" not in line and "student.kwargs.num_classes" in line, line
        assert "data.num_classes" in line, line
