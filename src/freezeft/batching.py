"""Batches of similar-length samples, shuffled per epoch and sharded across ranks."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["BucketBatchSampler"]


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar-length utterances; batch order shuffled per epoch (seeded).

    In distributed runs each rank takes every ``num_replicas``-th batch; the batch list
    is padded by wrapping around so every rank gets the same number of batches.

    Args:
        sizes: a length proxy per sample (file size in bytes).
        batch_size: samples per batch.
        shuffle: shuffle the batch order each epoch (call :meth:`set_epoch`).
        seed: base seed of the shuffle.
        num_replicas: number of ranks.
        rank: this rank.

    Example::

        >>> sampler = BucketBatchSampler([5, 1, 4, 2, 3], batch_size=2, shuffle=False)
        >>> list(sampler)  # shortest first, by size
        [[1, 3], [4, 2], [0]]
    """

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"Expected `batch_size` >= 1, but got {batch_size}.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"Expected 0 <= rank < num_replicas, but got {rank}, {num_replicas}.")
        order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
        self.batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle of ``epoch`` (Lightning calls this each epoch)."""
        self.epoch = epoch

    def skip_batches(self, count: int) -> None:
        """Leave out the first ``count`` batches of the next iteration only (mid-epoch resume)."""
        self._skip = count

    def __len__(self) -> int:
        return math.ceil(len(self.batches) / self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(len(self.batches)))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(order), generator=generator).tolist()
        total = len(self) * self.num_replicas
        order = (order * math.ceil(total / max(len(order), 1)))[:total] if order else []
        skip, self._skip = self._skip, 0
        for index in order[self.rank :: self.num_replicas][skip:]:
            yield self.batches[index]
