"""DataLoader construction with reproducible shuffling, worker seeding and distributed sampling."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    Subset,
)

from emcl.data.datasets import collate_skip
from emcl.data.workers import loader_context

__all__ = ["EpochKeyedSampler", "EpochRandomSampler", "build_loader", "set_epoch", "worker_init_fn"]


def worker_init_fn(worker_id: int) -> None:
    """Seed numpy and ``random`` in each worker from torch's per-worker initial seed.

    Torch gives every worker ``base_seed + worker_id``; without this, numpy/random state would be
    copied from the parent and identical in all workers.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class EpochRandomSampler(RandomSampler):
    """RandomSampler whose order depends only on (seed, epoch) once :meth:`set_epoch` is called.

    Without ``set_epoch`` each pass continues the seeded generator (still reproducible from the seed);
    with it, a run resumed at epoch ``e`` sees the same order as an uninterrupted one.
    """

    def __init__(self, data_source: Dataset, seed: int) -> None:
        self.seed = int(seed)
        super().__init__(data_source, generator=torch.Generator().manual_seed(self.seed))

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + int(epoch))


class EpochKeyedSampler(Sampler):
    """Wraps a sampler so it yields ``(epoch, index)`` keys instead of plain indices.

    Datasets that draw random numbers per sample (augmentation) seed them from the key, so what a
    sample looks like depends only on (seed, epoch, index): not on the number of workers, on which
    worker runs it, or on whether the run was resumed. Persistent workers never see ``set_epoch`` on
    their copy of the dataset; the key carries the epoch to them.
    """

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, i) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def build_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int, workers: int,
                 drop_last: bool = False, distributed: bool | None = None,
                 collate_fn: Callable | None = None, epoch_keys: bool = False) -> DataLoader:
    """A DataLoader with seeded order and workers.

    ``distributed=None`` uses a :class:`DistributedSampler` (``batch_size`` is per rank) whenever
    ``torch.distributed`` is initialised; otherwise a seeded :class:`EpochRandomSampler` when shuffling,
    else sequential order. Workers are persistent and start without fork
    (:mod:`emcl.data.workers`), and memory is pinned when CUDA is available. The
    default ``collate_fn`` is :func:`~emcl.data.datasets.collate_skip`. ``epoch_keys`` wraps the sampler
    in :class:`EpochKeyedSampler` (the dataset must accept ``(epoch, index)`` keys).
    """
    if batch_size < 1 or workers < 0:
        raise ValueError(f"batch_size must be >= 1 and workers >= 0, got {batch_size}, {workers}")
    dist_on = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = dist_on
    if distributed and not dist_on:
        raise RuntimeError("build_loader(distributed=True) needs torch.distributed to be initialised")
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        sampler = EpochRandomSampler(dataset, seed)
    else:
        sampler = SequentialSampler(dataset)
    if epoch_keys:
        sampler = EpochKeyedSampler(sampler)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn or collate_skip,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        worker_init_fn=worker_init_fn,
        generator=torch.Generator().manual_seed(int(seed) + 1),
        persistent_workers=workers > 0,
        multiprocessing_context=loader_context(workers),
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the loader's sampler which epoch starts (different, reproducible order per epoch)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def rank_subset(dataset: Dataset, rank: int, world_size: int) -> Subset:
    """Items ``rank::world_size`` of an evaluation set, without the padding a DistributedSampler adds;
    items carry their dataset index, so the ranks' outputs go back in order
    (:func:`emcl.dist.gather_in_order`)."""
    return Subset(dataset, list(range(rank, len(dataset), world_size)))
