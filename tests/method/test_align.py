import pytest
import torch

from cskd.errors import GridError
from cskd.method.align import align_to_grid


def _grid_values(h, w, c=3, n=2):
    return torch.randn(n, h * w, c, dtype=torch.float64)


def _block_mean(values, h, w, th, tw):
    """Reference written with loops: average each (h/th) x (w/tw) block."""
    n, _, c = values.shape
    grid = values.reshape(n, h, w, c)
    bh, bw = h // th, w // tw
    out = torch.empty(n, th, tw, c, dtype=values.dtype)
    for i in range(th):
        for j in range(tw):
            out[:, i, j] = grid[:, i * bh : (i + 1) * bh, j * bw : (j + 1) * bw].mean(dim=(1, 2))
    return out.reshape(n, th * tw, c)


@pytest.mark.parametrize(
    "source, target",
    [
        ((14, 14), (7, 7)),
        ((8, 8), (4, 4)),
        ((8, 6), (4, 3)),
        ((8, 6), (2, 3)),  # factor 4 down the rows, 2 across: a swapped axis cannot pass
        ((6, 12), (3, 3)),  # factor 2 down, 4 across
    ],
)
def test_integer_ratios_average_whole_blocks(source, target):
    values = _grid_values(*source)
    expected = _block_mean(values, *source, *target)
    torch.testing.assert_close(align_to_grid(values, source, target), expected)


def test_equal_grids_are_identity():
    values = _grid_values(7, 7)
    assert align_to_grid(values, (7, 7), (7, 7)) is values


def test_non_integer_ratio_weights_cells_by_overlap_area():
    # 12 -> 5: each target cell spans 2.4 source cells. Cell 0 covers [0, 2.4): cells 0, 1 fully
    # and 0.4 of cell 2, so its weights are (1, 1, 0.4) / 2.4; cell 1 covers [2.4, 4.8):
    # 0.6 of cell 2, cell 3, 0.8 of cell 4.
    values = _grid_values(12, 12, c=1, n=1)
    out = align_to_grid(values, (12, 12), (5, 5)).reshape(5, 5)
    grid = values.reshape(12, 12)
    row0 = torch.tensor([1, 1, 0.4] + [0] * 9, dtype=torch.float64) / 2.4
    row1 = torch.tensor([0, 0, 0.6, 1, 0.8] + [0] * 7, dtype=torch.float64) / 2.4
    torch.testing.assert_close(out[0, 0], row0 @ grid @ row0)
    torch.testing.assert_close(out[1, 0], row1 @ grid @ row0)
    # a constant map stays constant, and the overall mean is preserved for equal-area cells
    ones = torch.ones(1, 144, 2)
    torch.testing.assert_close(align_to_grid(ones, (12, 12), (5, 5)), torch.ones(1, 25, 2))
    torch.testing.assert_close(out.mean(), grid.mean())


def test_student_grid_smaller_than_teacher_is_refused_naming_both():
    with pytest.raises(GridError, match="student grid 4x4 is smaller than the teacher grid 7x7"):
        align_to_grid(_grid_values(4, 4), (4, 4), (7, 7))


def test_pooling_commutes_with_a_linear_head():
    tokens = torch.randn(2, 196, 16, dtype=torch.float64)
    head = torch.nn.Linear(16, 5).double()
    for target in [(7, 7), (5, 5)]:
        torch.testing.assert_close(
            head(align_to_grid(tokens, (14, 14), target)),
            align_to_grid(head(tokens), (14, 14), target),
        )


def _overlap(source: int, target: int) -> torch.Tensor:
    """(target, source): the length of [i s/t, (i+1) s/t) inside source cell j, normalised."""
    rows = []
    for i in range(target):
        low, high = i * source / target, (i + 1) * source / target
        rows.append([max(0.0, min(high, j + 1) - max(low, j)) for j in range(source)])
    weights = torch.tensor(rows, dtype=torch.float64)
    return weights / weights.sum(dim=1, keepdim=True)


@pytest.mark.parametrize(
    "source, target", [((12, 9), (5, 4)), ((9, 12), (4, 5)), ((10, 7), (3, 7))]
)
def test_non_square_non_integer_grids_pool_each_axis_by_its_own_overlaps(source, target):
    values = _grid_values(*source, c=1, n=1)
    out = align_to_grid(values, source, target).reshape(*target)
    grid = values.reshape(*source)
    expected = _overlap(source[0], target[0]) @ grid @ _overlap(source[1], target[1]).T
    torch.testing.assert_close(out, expected)
