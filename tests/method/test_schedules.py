import math

import pytest

from cskd.method.schedules import local_weight, training_progress


@pytest.mark.parametrize("schedule", ["linear", "x2", "cos"])
def test_ckf_schedules_fall_from_one_to_zero(schedule):
    assert local_weight(0.0, schedule) == pytest.approx(1.0)
    assert local_weight(1.0, schedule) == pytest.approx(0.0, abs=1e-12)
    values = [local_weight(i / 10, schedule) for i in range(11)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_schedule_midpoints_match_their_formulas():
    assert local_weight(0.25, "linear") == pytest.approx(0.75)
    assert local_weight(0.25, "x2") == pytest.approx(0.5625)
    assert local_weight(0.5, "cos") == pytest.approx(math.sqrt(0.5))


@pytest.mark.parametrize("progress", [0.0, 0.3, 1.0])
def test_dense_and_global_hold_the_weight_fixed(progress):
    assert local_weight(progress, "dense") == 1.0
    assert local_weight(progress, "global") == 0.0


def test_bad_schedule_and_progress_are_refused():
    with pytest.raises(ValueError, match="unknown CKF schedule 'lin'"):
        local_weight(0.5, "lin")
    with pytest.raises(ValueError, match="progress"):
        local_weight(1.5, "linear")


def test_progress_per_epoch_is_constant_within_an_epoch_and_per_step_is_not():
    kw = dict(steps_per_epoch=10, epochs=4)
    assert training_progress(epoch=1, step_in_epoch=0, **kw) == 0.25
    assert training_progress(epoch=1, step_in_epoch=9, **kw) == 0.25
    assert training_progress(epoch=1, step_in_epoch=5, unit="step", **kw) == pytest.approx(15 / 40)
    with pytest.raises(ValueError, match="progress unit"):
        training_progress(epoch=0, step_in_epoch=0, unit="batch", **kw)
