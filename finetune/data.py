"""Seeded data order, independent of the number of processes, and per-sample random draws.

The run's sample stream is fixed by the seed alone: epoch ``e`` is ``randperm(N)`` seeded with
``seed + e``, cut into *global* batches of ``train_batch_size x num_processes``; process ``r`` takes
the ``r``-th slice of each. One process with batch 2B therefore sees exactly the samples that two
processes with batch B see together, and a resumed run continues at the same position.

Each sample also carries its *position* in the stream (a unique integer). Losses draw their noise
and timesteps from a generator seeded with ``(seed, position)`` (:func:`generators`), so the draws
do not depend on how the batch is split across processes or micro-batches, nor on resumption.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset


class SeededOrder:
    """Global batch ``k`` of the stream -> its ``(index, position)`` pairs, epoch after epoch."""

    def __init__(self, num_items: int, global_batch: int, seed: int):
        if num_items < global_batch:
            raise ValueError(
                f"train_batch_size: the dataset has {num_items} items, fewer than one global batch of {global_batch} "
                "(train_batch_size x processes); lower train_batch_size or add data"
            )
        self.n, self.batch, self.seed = num_items, global_batch, seed
        self.per_epoch = num_items // global_batch  # the incomplete last batch is dropped
        self._epoch, self._perm = None, None

    def epoch_of(self, k: int) -> int:
        return k // self.per_epoch

    def __call__(self, k: int) -> list[tuple[int, int]]:
        epoch, i = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        start = i * self.batch
        return [(self._perm[start + j], k * self.batch + j) for j in range(self.batch)]


class _RankBatches:
    """Batch sampler: this process's slice of global batches ``start, start+1, ...``."""

    def __init__(self, order: SeededOrder, rank: int, per_device: int, start: int, stop: int):
        self.order, self.rank, self.per_device, self.start, self.stop = order, rank, per_device, start, stop

    def __iter__(self):
        lo = self.rank * self.per_device
        for k in range(self.start, self.stop):
            yield self.order(k)[lo : lo + self.per_device]

    def __len__(self):
        return self.stop - self.start


class _Positioned(Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, position = key
        return position, self.dataset[index]


def loader(dataset, collate, order: SeededOrder, rank: int, per_device: int, start: int, stop: int, num_workers: int = 0):
    """Batches ``start..stop-1`` of this process: ``collate(items)`` plus ``batch["positions"]``."""

    def collate_fn(pairs):
        positions = torch.tensor([p for p, _ in pairs], dtype=torch.long)
        batch = collate([item for _, item in pairs])
        batch["positions"] = positions
        return batch

    return DataLoader(
        _Positioned(dataset),
        batch_sampler=_RankBatches(order, rank, per_device, start, stop),
        collate_fn=collate_fn,
        num_workers=num_workers,
    )


def generators(seed: int, positions, salt: int = 0) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by ``(seed, position, salt)``."""
    out = []
    for p in torch.as_tensor(positions).tolist():
        out.append(torch.Generator().manual_seed((seed * 1_000_003 + int(p)) * 31 + salt))
    return out


def randn(gens: list[torch.Generator], shape, device=None) -> torch.Tensor:
    """A standard normal tensor ``(len(gens), *shape)``: row i from ``gens[i]``."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens]).to(device)


def randint(gens: list[torch.Generator], low: int, high: int, device=None) -> torch.Tensor:
    return torch.stack([torch.randint(low, high, (), generator=g) for g in gens]).to(device)


def rand(gens: list[torch.Generator], device=None) -> torch.Tensor:
    return torch.stack([torch.rand((), generator=g) for g in gens]).to(device)
