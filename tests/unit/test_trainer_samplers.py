"""Class-balanced sampling (uniform classes, 4 images each), instance-balanced sampling, per-rank streams."""

from __future__ import annotations

from collections import Counter

import pytest

from trainer.data import long_tail_counts
from trainer.samplers import ClassBalancedBatchSampler, InstanceBalancedBatchSampler

COUNTS = long_tail_counts(10, 200, 100)  # 200 ... 2
TARGETS = [c for c, n in enumerate(COUNTS) for _ in range(n)]


def test_class_balanced_batches_are_groups_of_four_of_one_class():
    sampler = ClassBalancedBatchSampler(TARGETS, batch_size=32, steps=50, seed=0)
    for batch in sampler:
        assert len(batch) == 32
        labels = [TARGETS[i] for i in batch]
        for g in range(0, 32, 4):
            assert len(set(labels[g : g + 4])) == 1
            if COUNTS[labels[g]] >= 4:  # enough images: four different ones
                assert len(set(batch[g : g + 4])) == 4


def test_class_balanced_classes_are_uniform_despite_the_long_tail():
    sampler = ClassBalancedBatchSampler(TARGETS, batch_size=64, steps=500, seed=1)
    classes = Counter(TARGETS[batch[g]] for batch in sampler for g in range(0, 64, 4))
    total = sum(classes.values())  # 8000 draws: expected 800 per class, sd ~ 27
    assert set(classes) == set(range(10))
    for c in range(10):
        assert classes[c] / total == pytest.approx(0.1, abs=0.012)
    # instance-uniform sampling would give the head class 200 / sum(COUNTS) ~ 40 %
    assert sum(COUNTS) > 2 * 200


def test_instance_balanced_is_a_permutation_per_pass():
    sampler = InstanceBalancedBatchSampler(TARGETS, batch_size=len(TARGETS) // 4, steps=4, seed=0)
    seen = [i for batch in sampler for i in batch]
    assert sorted(seen) == list(range(len(TARGETS)))


def test_streams_depend_on_seed_epoch_and_rank_only():
    def draw(seed=0, rank=0, phase=1, epoch=0):
        s = ClassBalancedBatchSampler(TARGETS, 16, 3, seed=seed, rank=rank)
        s.set_epoch(phase, epoch)
        return list(s)

    assert draw() == draw()
    assert draw() != draw(rank=1)
    assert draw() != draw(epoch=1)
    assert draw() != draw(phase=2)
    assert draw() != draw(seed=1)


def test_small_classes_are_drawn_with_replacement():
    targets = [0] * 10 + [1] * 2
    sampler = ClassBalancedBatchSampler(targets, batch_size=8, steps=20, seed=0)
    for batch in sampler:
        for g in range(0, 8, 4):
            assert len({targets[i] for i in batch[g : g + 4]}) == 1
