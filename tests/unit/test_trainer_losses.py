"""A-GCL against numbers computed by hand from the method note's formula (noise fixed)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import AGCL, CB_GAMMAS, IB_GAMMAS, asymmetric_single_label_loss, cloud_sizes, sample_noise

# Class sizes 100, 10, 1: m = log(100) - log(n_c) = [0, log 10, log 100], so m / max(m) = [0, 0.5, 1] exactly.
COUNTS = (100, 10, 1)


def hand_loss(perturbed: list[float], target: int, gamma_pos: float, gamma_neg: float, eps: float = 0.1) -> float:
    """The method note's loss for one row, written out with ``math`` (perturbed logits already scaled)."""
    c = len(perturbed)
    denom = sum(math.exp(v) for v in perturbed)
    p = [math.exp(v) / denom for v in perturbed]
    total = 0.0
    for j in range(c):
        if j == target:
            total += (1 - eps + eps / c) * (1 - p[j]) ** gamma_pos * math.log(p[j])
        else:
            total += (eps / c) * p[j] ** gamma_neg * math.log(p[j])
    return -total


def test_cloud_sizes_are_log_gaps_normalised():
    assert cloud_sizes(COUNTS).tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert cloud_sizes([7, 7, 7]).tolist() == [0.0, 0.0, 0.0]  # balanced: no cloud, no 0/0


def test_agcl_matches_hand_computation_class_balanced_branch():
    z = torch.tensor([[0.3, -0.2, 0.5]])
    e = torch.tensor([[0.6, -0.9, 0.3]])
    # z' = z - 0.5 |e| m/max(m):  0.3 - 0 = 0.3;  -0.2 - 0.5*0.9*0.5 = -0.425;  0.5 - 0.5*0.3*1 = 0.35
    # target 1 loses the margin 0.1: -0.525; times s = 20: [6.0, -10.5, 7.0]
    expected = hand_loss([6.0, -10.5, 7.0], target=1, gamma_pos=0.0, gamma_neg=4.0)
    loss = AGCL(COUNTS, *CB_GAMMAS)(z, torch.tensor([1]), noise=e)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_agcl_matches_hand_computation_instance_balanced_branch_batch_mean():
    z = torch.tensor([[0.3, -0.2, 0.5], [-0.1, 0.4, 0.2]])
    e = torch.tensor([[0.6, -0.9, 0.3], [-1.0, 0.2, 0.4]])
    # row 1 (target 1): as above -> [6.0, -10.5, 7.0]
    # row 2 (target 2): [-0.1, 0.4 - 0.5*0.2*0.5, 0.2 - 0.5*0.4*1] = [-0.1, 0.35, 0.0]
    #                   margin on the target -> [-0.1, 0.35, -0.1]; x20 -> [-2, 7, -2]
    row1 = hand_loss([6.0, -10.5, 7.0], target=1, gamma_pos=0.5, gamma_neg=8.0)
    row2 = hand_loss([-2.0, 7.0, -2.0], target=2, gamma_pos=0.5, gamma_neg=8.0)
    loss = AGCL(COUNTS, *IB_GAMMAS)(z, torch.tensor([1, 2]), noise=e)
    assert float(loss) == pytest.approx((row1 + row2) / 2, rel=1e-5)


def test_zero_noise_reduces_to_margin_and_smoothing():
    z = torch.tensor([[0.1, 0.2, -0.3]])
    # e = 0: z' = z; target 0 -> 0.0; x20 -> [0, 4, -6]
    expected = hand_loss([0.0, 4.0, -6.0], target=0, gamma_pos=0.0, gamma_neg=4.0)
    loss = AGCL(COUNTS, *CB_GAMMAS)(z, torch.tensor([0]), noise=torch.zeros(1, 3))
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_gradients_flow_through_the_focusing_weights():
    logits = torch.tensor([[1.0, 2.0, -0.5]], requires_grad=True)
    target = torch.tensor([0])
    asymmetric_single_label_loss(logits, target, 0.5, 8.0, 0.1).backward()
    with_weights = logits.grad.clone()
    # the same loss with the weights detached: a different gradient, so the weights are not constants
    logits.grad = None
    log_p = torch.log_softmax(logits, 1)
    p = log_p.exp()
    w = torch.stack([(1 - p[0, 0]) ** 0.5, p[0, 1] ** 8, p[0, 2] ** 8]).detach()
    t = torch.tensor([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
    (-(t * w * log_p[0]).sum()).backward()
    assert not torch.allclose(with_weights, logits.grad)


def test_confident_rows_stay_finite():
    # p_t rounds to 1 in float32: (1 - p_t) ** 0.5 must not turn the gradient into NaN
    logits = torch.tensor([[80.0, -40.0, -40.0]], requires_grad=True)
    loss = asymmetric_single_label_loss(logits, torch.tensor([0]), 0.5, 8.0, 0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_noise_is_clipped_fresh_each_step_and_reproducible():
    gen = torch.Generator().manual_seed(0)
    a, b = sample_noise((4000, 3), gen), sample_noise((4000, 3), gen)
    assert not torch.equal(a, b)
    assert a.abs().max() <= 1.0
    assert float(a.std()) == pytest.approx(1 / 3, rel=0.05)
    seeded = [sample_noise((5, 3), torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(*seeded)


def test_rarer_classes_get_larger_perturbations():
    z = torch.zeros(1, 3)
    loss_fn = AGCL(COUNTS, *CB_GAMMAS, margin=0.0)
    # with |e| = 1 everywhere the head class is untouched and the rarest moves by 0.5: only its logit drops
    plain = AGCL((5, 5, 5), *CB_GAMMAS, margin=0.0)(z, torch.tensor([0]), noise=torch.ones(1, 3))
    clouded = loss_fn(z, torch.tensor([0]), noise=torch.ones(1, 3))
    assert float(clouded) < float(plain)  # negatives pushed down -> lower loss for the head-class target
