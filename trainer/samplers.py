"""Batch samplers for LPT's dual sampling, deterministic for a seed and split across data-parallel ranks.

Each sampler yields ``steps`` lists of dataset indices per epoch, so the class-balanced and the
instance-balanced stream can be zipped step by step. Every (seed, epoch, rank) gets its own stream:
ranks draw different images, and a run resumed at an epoch boundary draws exactly what the
uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset


def stream_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed mixing the run seed with (phase, epoch, rank, stream id, ...)."""
    value = seed & 0x7FFFFFFFFFFFFFFF
    for part in parts:
        # splitmix64-style mixing, so neighbouring epochs or ranks do not get correlated streams.
        value = (value * 0x9E3779B97F4A7C15 + part + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


class _EpochSampler:
    def __init__(self, targets: Sequence[int], batch_size: int, steps: int, seed: int, rank: int, stream: int):
        if batch_size < 1 or steps < 1:
            raise ValueError(f"batch_size and steps must be >= 1, got {batch_size}, {steps}")
        self.targets = [int(t) for t in targets]
        self.batch_size = batch_size
        self.steps = steps
        self.seed = seed
        self.rank = rank
        self.stream = stream
        self.phase = 0
        self.epoch = 0

    def set_epoch(self, phase: int, epoch: int) -> None:
        """Select the stream of (phase, epoch); call before iterating."""
        self.phase, self.epoch = phase, epoch

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(stream_seed(self.seed, self.phase, self.epoch, self.rank, self.stream))

    def __len__(self) -> int:
        return self.steps


class _Cycle:
    """Endless walk over ``items`` in a fresh seeded shuffle per pass (the authors' ``RandomCycleIter``)."""

    def __init__(self, items: torch.Tensor, gen: torch.Generator):
        self.items, self.gen = items, gen
        self.order, self.pos = items[torch.randperm(len(items), generator=gen)], 0

    def take(self, n: int) -> list[int]:
        """The next ``n`` items; distinct when there are at least ``n`` (a new pass starting mid-take puts
        the items already taken last)."""
        out: list[int] = []
        while len(out) < n:
            if self.pos == len(self.order):
                order = self.items[torch.randperm(len(self.items), generator=self.gen)].tolist()
                self.order = torch.tensor(sorted(order, key=lambda i: i in out), dtype=self.items.dtype)
                self.pos = 0
            out.append(int(self.order[self.pos]))
            self.pos += 1
        return out


class ClassBalancedBatchSampler(_EpochSampler):
    """Cycle through the classes in shuffled order, taking ``per_class`` images of each; repeat until full.

    Every class is visited equally often (to within one visit per epoch), however long its tail, and a
    class's images are themselves cycled in shuffled order, so a five-image class shows all five before
    any repeats: the authors' class-aware sampler. Drawing classes independently at random instead gives
    some classes twice as many visits as others in a short epoch.

    Args:
        targets: class index per dataset item.
        batch_size: images per batch on this rank.
        steps: batches per epoch.
        seed: run seed.
        rank: data-parallel rank (its stream differs from the other ranks').
        per_class: images per visited class (4 in the method note).
    """

    def __init__(
        self, targets: Sequence[int], batch_size: int, steps: int, seed: int = 0, rank: int = 0, per_class: int = 4
    ):
        super().__init__(targets, batch_size, steps, seed, rank, stream=1)
        self.per_class = per_class
        by_class: dict[int, list[int]] = defaultdict(list)
        for index, target in enumerate(self.targets):
            by_class[target].append(index)
        self.classes = sorted(by_class)
        self.by_class = [torch.tensor(by_class[c]) for c in self.classes]

    def __iter__(self) -> Iterator[list[int]]:
        gen = self._generator()
        classes = _Cycle(torch.arange(len(self.classes)), gen)
        members = [_Cycle(m, gen) for m in self.by_class]
        groups = -(-self.batch_size // self.per_class)
        for _ in range(self.steps):
            batch: list[int] = []
            for c in classes.take(groups):
                batch.extend(members[c].take(self.per_class))
            yield batch[: self.batch_size]


class InstanceBalancedBatchSampler(_EpochSampler):
    """Uniform over images: a fresh permutation of the dataset, cycled until ``steps`` batches are drawn.

    Args:
        targets: class index per dataset item (only its length is used).
        batch_size: images per batch on this rank.
        steps: batches per epoch.
        seed: run seed.
        rank: data-parallel rank.
    """

    def __init__(self, targets: Sequence[int], batch_size: int, steps: int, seed: int = 0, rank: int = 0):
        super().__init__(targets, batch_size, steps, seed, rank, stream=2)

    def __iter__(self) -> Iterator[list[int]]:
        gen = self._generator()
        n = len(self.targets)
        order = torch.randperm(n, generator=gen)
        pos = 0
        for _ in range(self.steps):
            batch: list[int] = []
            while len(batch) < self.batch_size:
                if pos == n:
                    order, pos = torch.randperm(n, generator=gen), 0
                take = min(self.batch_size - len(batch), n - pos)
                batch.extend(order[pos : pos + take].tolist())
                pos += take
            yield batch


def dual_sampling_loaders(
    dataset: Dataset,
    batch_size: int,
    steps: int,
    *,
    seed: int,
    rank: int,
    phase: int,
    epoch: int,
    images_per_class: int,
    workers: int = 0,
    pin_memory: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """One epoch's class-balanced and instance-balanced loaders, ``steps`` batches each, to be zipped.

    Args:
        dataset: the training set (``targets`` attribute: one class index per image).
        batch_size: images per batch on this rank, in each stream.
        steps: batches per epoch.
        seed: the run seed.
        rank: this process's data-parallel rank.
        phase: 1 or 2 (each phase has its own streams).
        epoch: 0-based epoch within the phase.
        images_per_class: consecutive images of one class in the class-balanced stream.
        workers: DataLoader worker processes.
        pin_memory: pin batches (CUDA).
    """
    targets = dataset.targets  # type: ignore[attr-defined]
    cb = ClassBalancedBatchSampler(targets, batch_size, steps, seed, rank, per_class=images_per_class)
    ib = InstanceBalancedBatchSampler(targets, batch_size, steps, seed, rank)
    loaders = []
    for stream, sampler in enumerate((cb, ib)):
        sampler.set_epoch(phase, epoch)
        gen = torch.Generator().manual_seed(stream_seed(seed, phase, epoch, rank, 10 + stream))
        loaders.append(
            DataLoader(dataset, batch_sampler=sampler, num_workers=workers, generator=gen, pin_memory=pin_memory)
        )
    return loaders[0], loaders[1]
