"""``bagnet19`` and ``bagnet27``: each cell of the map sees a bounded 19 x 19 (27 x 27) px
window (measured from the gradient, against a ResNet-18 whose cells see the whole canvas), it is a
CSKD teacher, and the library builds it by name."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch

import cskd.models  # noqa: F401  (registers bagnet19)
from cskd.method.adapters import DenseTeacher
from cskd.models.bagnet import RECEPTIVE_FIELD
from cskd.training.locality import receptive_field

WIDTHS = [8, 16, 32, 64]


def _bagnet(name: str = "bagnet19", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    # zero_init_last=False: at initialisation timm zeroes each residual branch's last BatchNorm,
    # and only the shortcuts (1x1) would reach a cell
    return timm.create_model(
        name, num_classes=10, in_chans=1, channels=WIDTHS, zero_init_last=False, **kwargs
    )


@pytest.mark.parametrize(("name", "size", "offset"), [("bagnet19", 19, -9), ("bagnet27", 27, -13)])
def test_each_cell_sees_a_bounded_window_of_a_64_px_canvas(name, size, offset):
    images = torch.randn(8, 1, 64, 64)
    assert _bagnet(name).forward_features(images).shape == (8, WIDTHS[-1], 8, 8)
    field = receptive_field(_bagnet(name), images)
    # the arithmetic of the module docstring, measured: 30% (bagnet19) or 42% of the canvas side
    assert field.size == RECEPTIVE_FIELD[name] == size and field.stride == 8
    # the window of the central cell (4, 4), whose pixels are 32..39, starts at 32 + offset
    assert field.offset == offset
    # the same measurement finds the whole canvas for the translated regime's ResNet-18
    torch.manual_seed(0)
    resnet = timm.create_model(
        "resnet18",
        num_classes=10,
        in_chans=1,
        channels=WIDTHS,
        output_stride=8,
        zero_init_last=False,
    )
    assert receptive_field(resnet, images).size == 64


def test_output_stride_8_is_native_and_the_map_follows_the_image_size():
    images = torch.randn(2, 1, 32, 32)
    assert _bagnet(output_stride=8).forward_features(images).shape[-2:] == (4, 4)
    assert _bagnet(output_stride=32).forward_features(images).shape[-2:] == (4, 4)


def test_dense_teacher_takes_it_and_its_cells_average_to_its_output():
    model = _bagnet().eval()
    teacher = DenseTeacher(
        model, name="bagnet19", check_size=64, mean=(0.089,), std=(0.238,), in_chans=1
    )
    assert not teacher.global_only and teacher.grid(64) == (8, 8)
    output = teacher(torch.randn(3, 1, 64, 64))
    assert output.dense_logits.shape == (3, 10, 8, 8)
    torch.testing.assert_close(output.dense_logits.mean((2, 3)), output.global_logits)


@pytest.mark.parametrize("name", ["bagnet19", "bagnet27"])
def test_the_library_knows_the_name_before_building_any_model(tmp_path, name):
    """A run, the pre-flight and load_teacher find each BagNet by name, with no import by the
    user, and timm has its pretrained_cfg (64 px input, no weights)."""
    model = _bagnet(name)
    torch.save(model.state_dict(), tmp_path / "bagnet.pth")
    code = (
        "import sys, timm; from cskd.training import preflight; "
        f"assert timm.is_model('{name}'); from cskd import load_teacher; "
        f"cfg = timm.models.get_pretrained_cfg('{name}'); "
        "assert cfg.input_size == (3, 64, 64) and not cfg.url, cfg; "
        f"t = load_teacher('{name}', sys.argv[1], num_classes=10, in_chans=1, channels={WIDTHS},"
        " image_size=64, mean=(0.5,), std=(0.5,)); print(t.grid(64))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "bagnet.pth")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "(8, 8)"
