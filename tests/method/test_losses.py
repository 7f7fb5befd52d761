import math

import pytest
import torch

from cskd.method.align import align_to_grid
from cskd.method.losses import (
    ObjectiveWeights,
    base_loss,
    cskd_loss,
    fused_target,
    objective,
    token_loss,
)

# One image, two classes, a 1 x 2 teacher grid. Local logits per location and the global logits:
DENSE = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2): loc0 = [2, 0], loc1 = [0, 1]
GLOBAL = torch.tensor([[0.0, 3.0]])  # (1, 2)
STUDENT = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (1, 2 locations, 2 classes)


def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def test_fused_target_mixes_local_and_global_logits():
    fused = fused_target(DENSE, GLOBAL, 0.75)
    # loc0: 0.75 * [2, 0] + 0.25 * [0, 3] = [1.5, 0.75]; loc1: 0.75 * [0, 1] + 0.25 * [0, 3]
    torch.testing.assert_close(fused[0, :, 0, 0], torch.tensor([1.5, 0.75]))
    torch.testing.assert_close(fused[0, :, 0, 1], torch.tensor([0.0, 1.5]))


def test_hard_cskd_loss_is_mean_cross_entropy_to_fused_argmax():
    # t = 0.25, linear: a = 0.75, fused argmax = (0, 1); CE per location by hand, mean of two.
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2))) / 2
    loss = cskd_loss(STUDENT, DENSE, GLOBAL, 0.25)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # t = 0.75: a = 0.25, loc0 fused = [0.5, 2.25] -> class 1; student loc0 [1, 0] -> CE = 1 + log(1 + e^-1)
    expected_late = (1 + math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2))) / 2
    assert cskd_loss(STUDENT, DENSE, GLOBAL, 0.75).item() == pytest.approx(expected_late, rel=1e-6)


def test_global_schedule_targets_the_global_argmax_everywhere():
    # a = 0: every location's target is argmax(GLOBAL) = 1
    expected = (1 + math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2))) / 2
    loss = cskd_loss(STUDENT, DENSE, GLOBAL, 0.0, schedule="global")
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_soft_cskd_loss_is_tau_squared_kl_summed_over_locations_per_image():
    tau, t = 2.0, 0.25
    fused = [[1.5, 0.75], [0.0, 1.5]]
    student = [[1.0, 0.0], [0.0, 2.0]]
    kl = 0.0
    for target, z in zip(fused, student):
        p = _softmax([v / tau for v in target])
        q = _softmax([v / tau for v in z])
        kl += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    one = cskd_loss(STUDENT, DENSE, GLOBAL, t, kind="soft", tau=tau)
    assert one.item() == pytest.approx(kl * tau**2, rel=1e-5)
    # divided by N: two copies of the image give the same value
    two = cskd_loss(
        STUDENT.repeat(2, 1, 1),
        DENSE.repeat(2, 1, 1, 1),
        GLOBAL.repeat(2, 1),
        t,
        kind="soft",
        tau=tau,
    )
    assert two.item() == pytest.approx(one.item(), rel=1e-6)


def test_student_on_a_finer_grid_is_pooled_to_the_teacher_grid():
    torch.manual_seed(0)
    student = torch.randn(2, 196, 5)
    dense, glob = torch.randn(2, 5, 7, 7), torch.randn(2, 5)
    pooled = align_to_grid(student, (14, 14), (7, 7))
    torch.testing.assert_close(
        cskd_loss(student, dense, glob, 0.4), cskd_loss(pooled, dense, glob, 0.4)
    )
    with pytest.raises(ValueError, match="student_grid"):
        cskd_loss(torch.randn(2, 200, 5), dense, glob, 0.4)


def test_token_losses():
    student, teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    assert token_loss(student, teacher).item() == pytest.approx(1 + math.log(1 + math.exp(-1)))
    tau = 2.0
    p, q = _softmax([0.0, 1.5]), _softmax([0.5, 0.0])
    kl = sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    # DeiT's soft loss: sum divided by N * K elements
    assert token_loss(student, teacher, kind="soft", tau=tau).item() == pytest.approx(
        kl * tau**2 / 2, rel=1e-5
    )


def test_base_loss_with_label_smoothing_and_soft_targets():
    logits, label = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    log_p = [2 - math.log(math.exp(2) + 1), -math.log(math.exp(2) + 1)]
    smoothed = -(0.95 * log_p[0] + 0.05 * log_p[1])
    assert base_loss(logits, label, label_smoothing=0.1).item() == pytest.approx(smoothed, rel=1e-6)
    soft = torch.tensor([[0.3, 0.7]])
    assert base_loss(logits, soft).item() == pytest.approx(-(0.3 * log_p[0] + 0.7 * log_p[1]))


def test_objective_composes_the_parts_per_method():
    torch.manual_seed(0)
    cls, dist = torch.randn(2, 5), torch.randn(2, 5)
    patches, dense, glob = torch.randn(2, 4, 5), torch.randn(2, 5, 2, 2), torch.randn(2, 5)
    targets = torch.tensor([1, 3])
    base = base_loss(cls, targets)
    token = token_loss(dist, glob)
    dense_loss = cskd_loss(patches, dense, glob, 0.5)
    common = dict(
        cls_logits=cls,
        targets=targets,
        dist_logits=dist,
        student_patch_logits=patches,
        teacher_dense_logits=dense,
        teacher_global_logits=glob,
        progress=0.5,
    )
    total, parts = objective(weights=ObjectiveWeights(method="none"), **common)
    assert total.item() == pytest.approx(base.item()) and set(parts) == {"loss", "base"}
    total, parts = objective(weights=ObjectiveWeights(method="deit", alpha=0.3), **common)
    assert total.item() == pytest.approx(0.7 * base.item() + 0.3 * token.item(), rel=1e-6)
    total, parts = objective(weights=ObjectiveWeights(method="cskd", cskd_weight=2.0), **common)
    expected = 0.5 * base.item() + 0.5 * token.item() + 2.0 * dense_loss.item()
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert parts["local_weight"] == 0.5 and parts["cskd"].item() == pytest.approx(dense_loss.item())
    with pytest.raises(ValueError, match="unknown method"):
        objective(weights=ObjectiveWeights(method="dino"), **common)
