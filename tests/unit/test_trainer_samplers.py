"""Class-balanced sampling (classes cycled, 4 images each), instance-balanced sampling, per-rank streams."""

from __future__ import annotations

from collections import Counter

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
    # 8000 visits, cycled: exactly 800 per class (independent draws would spread them by sd ~ 27)
    assert classes == dict.fromkeys(range(10), 800)
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


def test_every_class_is_visited_once_per_cycle_and_its_images_cycle_too():
    sampler = ClassBalancedBatchSampler(TARGETS, batch_size=40, steps=1, seed=3)  # 10 groups: one cycle
    (batch,) = list(sampler)
    assert sorted(TARGETS[batch[g]] for g in range(0, 40, 4)) == list(range(10))
    tail = 9  # 2 images: each shows once before either repeats
    group = next(batch[g : g + 4] for g in range(0, 40, 4) if TARGETS[batch[g]] == tail)
    assert sorted(group[:2]) == sorted(i for i, t in enumerate(TARGETS) if t == tail)


def test_small_classes_are_drawn_with_replacement():
    targets = [0] * 10 + [1] * 2
    sampler = ClassBalancedBatchSampler(targets, batch_size=8, steps=20, seed=0)
    for batch in sampler:
        for g in range(0, 8, 4):
            assert len({targets[i] for i in batch[g : g + 4]}) == 1
