"""A teacher map's locality: which cells can see the object, and what the teacher's cells answer
by kind of cell, against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import timm
import torch

import cskd.models  # noqa: F401  (registers bagnet19)
from cskd.errors import TeacherError
from cskd.method.adapters import DenseTeacher
from cskd.training.diagnostics import Probe
from cskd.training.locality import (
    ReceptiveField,
    measure_locality,
    sighted_cells,
    teacher_locality,
)


def test_a_cell_is_sighted_when_its_window_holds_an_object_pixel():
    # 8 px image, 2 x 2 map of 4 px cells, windows of 6 px starting 1 px above/left of the cell:
    # rows/columns [-1, 5) (clipped to [0, 5)) for cells 0 and [3, 9) (clipped [3, 8)) for 1
    field = ReceptiveField(size=6, stride=4, offset=-1)
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[0, 6, 6] = True  # only the window of cell (1, 1) holds it
    mask[1, 4, 1] = True  # row 4 is in both row windows, column 1 only in column window 0
    sighted = sighted_cells(mask, (2, 2), field)
    assert sighted[0].tolist() == [[False, False], [False, True]]
    assert sighted[1].tolist() == [[True, False], [True, False]]


def test_teacher_locality_by_kind_of_cell():
    # one image of class 0, 3 classes, a 2 x 2 map: cell (0, 0) is the object, (0, 1) is
    # background that sees it, (1, 0) and (1, 1) are blind
    dense = torch.tensor(
        [[2.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 2.0]]  # cells in row-major order
    ).T.reshape(1, 3, 2, 2)
    object_cells = torch.tensor([[[True, False], [False, False]]])
    sighted = torch.tensor([[[True, True], [False, False]]])
    result = teacher_locality(dense, torch.tensor([0]), object_cells=object_cells, sighted=sighted)
    e = math.e
    p = [e**2 / (e**2 + 2), e / (e + 2), 1 / (e + 2), 1 / (e**2 + 2)]  # P(class 0) per cell
    assert result["object_names_label"] == 100.0 and result["object_cells"] == 25.0
    assert result["object_label_probability"] == pytest.approx(100 * p[0])
    assert result["background_names_label"] == pytest.approx(100 / 3)
    assert result["background_label_probability"] == pytest.approx(100 * sum(p[1:]) / 3)
    assert result["background_cells"] == 75.0
    assert result["blind_names_label"] == 0.0 and result["blind_cells"] == 50.0
    assert result["blind_label_probability"] == pytest.approx(100 * (p[2] + p[3]) / 2)
    # no blind cell at all (a teacher whose cells see the whole image): NaN, not a score of 0
    everywhere = teacher_locality(
        dense, torch.tensor([0]), object_cells=object_cells, sighted=torch.ones(1, 2, 2).bool()
    )
    assert math.isnan(everywhere["blind_names_label"]) and everywhere["blind_cells"] == 0.0


class _Squares(torch.utils.data.Dataset):
    """64 px canvases each holding one bright 16 px square, the object, at a known place."""

    def __init__(self) -> None:
        self.corners = [(0, 0), (40, 8), (24, 24), (8, 40)]

    def __len__(self) -> int:
        return len(self.corners)

    def object_mask(self, index: int) -> torch.Tensor:
        mask = torch.zeros(64, 64, dtype=torch.bool)
        top, left = self.corners[index]
        mask[top : top + 16, left : left + 16] = True
        return mask

    def __getitem__(self, index: int) -> dict:
        return {"image": self.object_mask(index).float()[None], "target": index % 3}


def test_measure_locality_of_a_bagnet_on_a_probe():
    torch.manual_seed(0)
    model = timm.create_model(
        "bagnet19", num_classes=3, in_chans=1, channels=[8, 16, 32, 64], zero_init_last=False
    )
    teacher = DenseTeacher(model, check_size=64, mean=(0.5,), std=(0.5,), in_chans=1).eval()
    norm = (torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    probe = Probe(_Squares(), count=4, student_norm=norm, schedule="linear")
    result = measure_locality(teacher, probe)
    assert result["images"] == 4 and result["cell_px"] == 8
    assert (result["receptive_field_px"], result["receptive_field_offset_px"]) == (19, -9)
    # each 16 px square covers exactly 4 cells; a window [8i - 9, 8i + 10) meets rows
    # [top, top + 16) for 4 or 5 rows (columns) of cells: 16 + 20 + 25 + 20 sighted cells of 256
    assert result["object_cells"] == 100 * 16 / 256
    assert result["blind_cells"] == 100 * (256 - 81) / 256
    assert result["object_cells"] + result["background_cells"] == 100.0
    # a teacher without a dense map has no locality to measure
    global_only = DenseTeacher(model, global_only=True, mean=(0.5,), std=(0.5,), in_chans=1)
    with pytest.raises(TeacherError, match="dense map"):
        measure_locality(global_only, probe)
