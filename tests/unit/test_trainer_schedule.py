"""The instance-balanced weight schedule and the learning-rate schedule."""

from __future__ import annotations

import itertools

import pytest

from trainer.config import TrainConfig, ib_weight_at, lr_at


def test_instance_balanced_weight_decays_from_half_to_zero():
    # max(0, 0.5 * (E - e) / E) for E = 4
    assert [ib_weight_at(e, 4) for e in range(4)] == [0.5, 0.375, 0.25, 0.125]
    assert ib_weight_at(4, 4) == 0.0
    assert ib_weight_at(9, 4) == 0.0  # never negative
    assert ib_weight_at(0, 0) == 0.0


def test_default_lr_scales_with_batch():
    assert TrainConfig().base_lr == pytest.approx(0.8)  # B = 256
    assert TrainConfig(batch_size=64).base_lr == pytest.approx(0.2)
    assert TrainConfig(batch_size=64, lr=0.005).base_lr == 0.005  # the authors' 0.02 * B / 256


def test_warmup_from_1e6_then_cosine_to_zero():
    total, warm, base = 100, 10, 0.02
    assert lr_at(0, total, warm, base, 1e-6) == pytest.approx(1e-6)
    assert lr_at(5, total, warm, base, 1e-6) == pytest.approx(1e-6 + (base - 1e-6) * 0.5)
    assert lr_at(10, total, warm, base, 1e-6) == pytest.approx(base)
    assert lr_at(55, total, warm, base, 1e-6) == pytest.approx(base / 2)
    values = [lr_at(s, total, warm, base, 1e-6) for s in range(10, total)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert values[-1] < base * 0.01
