"""Diagnostics: teacher map quality and student agreement against hand-worked values, attention
distance against the mean pairwise patch distance under uniform attention, the per-epoch records
of ``train.diagnostics`` and the pictures of ``cskd diagnose`` on a tiny run."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import pytest
import timm
import torch
from conftest import HANG

from cskd.cli import main
from cskd.method.adapters import DenseStudent
from cskd.training.diagnostics import (
    attention_distance,
    object_cells,
    student_agreement,
    teacher_map_quality,
)


def one_hot_logits(classes: list[list[int]], num_classes: int) -> torch.Tensor:
    """(1, K, H, W) logits whose argmax at (i, j) is classes[i][j]."""
    cells = torch.tensor(classes)
    return torch.nn.functional.one_hot(cells, num_classes).permute(2, 0, 1)[None].float()


def test_teacher_map_quality_counts_cells_by_hand():
    dense = one_hot_logits([[0, 1], [2, 0]], 3)  # label 0: cells (0,0) and (1,1) right
    global_logits = torch.tensor([[0.0, 3.0, 0.0]])  # global answer: class 1
    mask = torch.tensor([[[True, True], [False, False]]])  # top row is the object
    quality = teacher_map_quality(dense, global_logits, torch.tensor([0]), object_mask=mask)
    assert quality["local_top1"] == 50.0
    assert quality["global_top1"] == 0.0
    assert quality["local_agrees_with_global"] == 25.0  # only (0, 1) says class 1
    assert quality["object_local_top1"] == 50.0 and quality["background_local_top1"] == 50.0
    assert quality["object_agrees_with_global"] == 50.0
    assert quality["background_agrees_with_global"] == 0.0
    assert quality["object_cells"] == 50.0
    p = torch.tensor([1.0, 0.0, 0.0]).softmax(0)  # each cell: one logit 1, two 0
    assert quality["local_entropy"] == pytest.approx(-(p * p.log()).sum().item(), rel=1e-5)


def test_student_agreement_at_each_target():
    dense = one_hot_logits([[0, 1], [2, 0]], 3) * 4  # strong local answers
    global_logits = torch.tensor([[0.0, 10.0, 0.0]])  # a strong global class 1
    student = torch.nn.functional.one_hot(torch.tensor([[0, 1, 1, 1]]), 3).float()  # (1, 4, 3)
    agreement = student_agreement(student, dense, global_logits, weight=1.0)
    assert agreement["follows_local"] == agreement["follows_ckf_target"] == 50.0  # (0,0), (0,1)
    assert agreement["follows_global"] == 75.0  # global: class 1 everywhere
    # a = 0.5: fused = 2 * one_hot + 5 * [0, 1, 0]: class 1 wins every cell
    assert (
        student_agreement(student, dense, global_logits, weight=0.5)["follows_ckf_target"] == 75.0
    )


def test_object_cells_pool_a_pixel_mask_onto_the_grid():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, :4, :4] = True  # the top-left quarter
    assert object_cells(mask, (2, 2)).tolist() == [[[True, False], [False, False]]]


def test_attention_distance_under_uniform_attention_is_the_mean_patch_distance():
    torch.manual_seed(0)
    model = timm.create_model(
        "deit_tiny_distilled_patch16_224",
        img_size=32,
        patch_size=8,
        embed_dim=16,
        depth=2,
        num_heads=2,
        num_classes=3,
    )
    for block in model.blocks:  # q = k = 0: every token attends uniformly to every token
        torch.nn.init.zeros_(block.attn.qkv.weight)
        torch.nn.init.zeros_(block.attn.qkv.bias)
    student = DenseStudent(model).train()
    fused = [block.attn.fused_attn for block in model.blocks]
    distances = attention_distance(student, torch.randn(2, 3, 32, 32))
    assert [block.attn.fused_attn for block in model.blocks] == fused  # put back
    centres = [(8.0 * i, 8.0 * j) for i, j in itertools.product(range(4), range(4))]
    expected = sum(math.dist(a, b) for a in centres for b in centres) / len(centres) ** 2
    assert distances == pytest.approx([expected, expected], rel=1e-5)
    assert student.training  # the mode it was in


def test_training_logs_diagnostics_and_cskd_diagnose_draws_them(tmp_path, tiny_run, capsys):
    overrides = {"train.diagnostics": "true", "train.diagnostics_images": 16}
    assert main(["train", *tiny_run(**overrides)]) == 0
    run_dir = tmp_path / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [record for record in records if record["type"] == "epoch"]
    assert len(epochs) == 2
    for epoch, record in enumerate(epochs):
        found = record["diagnostics"]
        assert found["local_weight"] == 1.0 - epoch / 2  # linear CKF, per-epoch progress
        assert len(found["attention_distance"]) == 2  # one value per block
        assert all(0.0 < value < 32 * math.sqrt(2) for value in found["attention_distance"])
        assert 0.0 <= found["teacher"]["local_top1"] <= 100.0
        assert set(found["student"]) == {"follows_ckf_target", "follows_local", "follows_global"}
        cutmix = found["cutmix"]
        assert set(cutmix) == {"teacher", "student", "token_target"}
        for kind in ("inside", "outside"):
            shares = cutmix["teacher"][kind]
            assert shares["pasted"] + shares["base"] + shares["neither"] == pytest.approx(100.0)

    capsys.readouterr()
    assert main(["diagnose", str(run_dir), "--images", "8"]) == 0
    shown = capsys.readouterr()
    final = json.loads(shown.out)
    out = run_dir / "diagnostics"
    listed = ", ".join(
        str(out / name)
        for name in ("diagnostics.json", "maps.png", "cutmix.png", "over_training.png")
    )
    assert f"cskd diagnose: wrote {listed}" in shown.err
    assert final["local_weight"] == 0.5 and "student" in final
    written = json.loads((run_dir / "diagnostics" / "diagnostics.json").read_text())
    assert written["images"] == 8 and len(written["over_training"]) == 2
    for picture in ("maps.png", "cutmix.png", "over_training.png"):
        assert (run_dir / "diagnostics" / picture).stat().st_size > 5000, picture


def test_diagnose_of_a_folder_without_a_run_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cskd", "diagnose", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no config.yaml" in lines[0]


def test_translated_object_mask_covers_the_garment_only():
    from cskd.data import SubsetDataset, TranslatedFashionMNIST, object_mask

    dataset = TranslatedFashionMNIST(split="test", canvas_size=64, clutter=3)
    subset = SubsetDataset(dataset=dataset, indices=[9, 4])
    mask = object_mask(subset, 1)
    top, left = dataset.placement(4)
    assert torch.equal(mask, dataset.object_mask(4))
    assert mask[top : top + 28, left : left + 28].any()
    outside = mask.clone()
    outside[top : top + 28, left : left + 28] = False
    assert not outside.any()
    image = dataset[4]["image"][0]
    assert (image[mask] > 0.09).all()  # the garment's own pixels


def test_the_diagnostics_give_the_teacher_its_own_normalisation():
    import timm
    from conftest import TINY_TEACHER

    from cskd.method.adapters import DenseTeacher
    from cskd.training.diagnostics import Probe

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=4, **TINY_TEACHER).eval()
    teacher_mean, teacher_std = (0.2, 0.3, 0.4), (0.1, 0.2, 0.3)
    teacher = DenseTeacher(model, check_size=32, mean=teacher_mean, std=teacher_std)
    seen = []
    stem = model.conv1  # the first layer sees exactly the teacher's input
    stem.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()))
    pixels = torch.rand(3, 3, 32, 32)
    dataset = [{"image": image, "target": 0} for image in pixels]
    student_norm = (torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.5))
    probe = Probe(dataset, count=3, student_norm=student_norm, schedule="linear")
    result = probe.measure(torch.nn.Identity(), teacher, progress=0.0)
    assert "teacher" in result and seen
    mean = torch.tensor(teacher_mean).view(1, 3, 1, 1)
    std = torch.tensor(teacher_std).view(1, 3, 1, 1)
    assert len(seen) == 2  # the probe batch, then the CutMix pairs of the mechanism probe
    torch.testing.assert_close(seen[0], (pixels - mean) / std)


def test_cutmix_answers_count_whose_label_each_cell_gives_inside_and_outside_the_box():
    from cskd.training.diagnostics import cutmix_answers

    targets = torch.tensor([0, 1, 2, 2])  # pairs (0, 3) and (1, 2); pair (1, 2) differs too
    partner = torch.zeros(4, 4, 4)
    partner[:, :2, :2] = 1.0  # the top-left quarter of every image is pasted
    answers = torch.full((4, 2, 2), 3)  # a class no image has: "neither"
    answers[0, 0, 0] = 2  # image 0, inside: its partner (image 3) has label 2 -> pasted
    answers[0, 1, 1] = 0  # image 0, outside: its own label -> base
    answers[1, 0, 0] = 1  # image 1, inside: its own label -> base
    answers[2, 1, 0] = 1  # image 2, outside: its partner's (image 1) label -> pasted
    found = cutmix_answers(answers, partner, targets)
    # every pair differs here: 4 inside cells and 12 outside cells
    assert found["inside"] == {"pasted": 25.0, "base": 25.0, "neither": 50.0, "cells": 4}
    assert found["outside"]["cells"] == 12
    assert found["outside"]["base"] == pytest.approx(100 / 12)
    assert found["outside"]["pasted"] == pytest.approx(100 / 12)
