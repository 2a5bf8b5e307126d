"""A resumable stream of per-rank training batches (docs/METHOD.md §6.2; docs/ARCHITECTURE.md §6.2).

The order of an epoch is a function of ``(seed, epoch)`` alone: torch's ``DistributedSampler``
shuffles with a generator seeded by ``seed + epoch`` and gives rank r every world_size-th index;
the flip flag of every image is drawn from ``(seed, epoch)`` too. The position in the stream is
therefore just ``(epoch, batch)``, which the training state stores; a resumed run skips to it and
sees exactly the batches an uninterrupted run would have seen. Incomplete tail batches are dropped,
as in DiT (``drop_last=True``).

A batch is ``(x, cond)``: images (B, C, H, W) and their :class:`~dydit.conditioning.Condition`,
class labels whose null class is the model's (``null_class``); a dataset whose ``get_batch`` returns
a condition itself (e.g. text) has it passed on as it is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from dydit.conditioning import Condition, as_condition
from dydit.data.base import ImageDataset
from dydit.errors import DyditError


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers, e.g. ``(seed, rank, step)``; stable across runs and platforms."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class DataStream:
    """Endless iterator of ``(x, cond)`` batches of ``batch_size`` for one rank; position ``(epoch, batch)``.

    Args:
        dataset: an :class:`~dydit.data.base.ImageDataset`.
        batch_size: per-rank batch size.
        seed: the run's seed; epoch orders and flips derive from it.
        rank, world_size: this process and the number of processes.
        flip: draw a horizontal flip for every image with probability 1/2.
        num_workers: DataLoader worker processes; in-memory datasets are batched in-process when 0.
        epoch, batch: the position to start from (a resumed run passes the stored one).
        null_class: the null class of the batches' class labels (default: the dataset's number of
            classes; a model with more classes passes its own).
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        flip: bool = False,
        num_workers: int = 0,
        epoch: int = 0,
        batch: int = 0,
        null_class: int | None = None,
    ):
        n = len(dataset)
        if n == 0:
            raise DyditError(f"dataset {dataset.info.name!r} is empty")
        if n // world_size < batch_size:
            raise DyditError(
                f"dataset {dataset.info.name!r} has {n} items, fewer than one global batch of "
                f"{batch_size * world_size} ({world_size} process(es) x {batch_size})"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.flip = flip
        self.num_workers = num_workers
        self.sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batches_per_epoch = len(self.sampler) // batch_size
        if not 0 <= batch < self.batches_per_epoch:
            raise DyditError(
                f"data position batch {batch} is outside an epoch of {self.batches_per_epoch} batches"
            )
        self.epoch = epoch
        self.batch = batch
        self.null_class = dataset.info.num_classes if null_class is None else null_class

    def state(self) -> dict[str, int]:
        """The position of the next batch: ``{"epoch": e, "batch": b}``."""
        return {"epoch": self.epoch, "batch": self.batch}

    def epoch_plan(self, epoch: int) -> tuple[Tensor, Tensor]:
        """This rank's (indices, flips) of ``epoch``, each (batches_per_epoch * batch_size,)."""
        self.sampler.set_epoch(epoch)
        indices = torch.tensor(list(iter(self.sampler)), dtype=torch.long)[
            : self.batches_per_epoch * self.batch_size
        ]
        if self.flip:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, 0xF11B))
            flips = torch.rand(len(self.dataset), generator=g) < 0.5
        else:
            flips = torch.zeros(len(self.dataset), dtype=torch.bool)
        return indices, flips[indices]

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        indices, flips = self.epoch_plan(epoch)
        indices = indices.view(self.batches_per_epoch, self.batch_size)[start:]
        flips = flips.view(self.batches_per_epoch, self.batch_size)[start:]
        if self.num_workers == 0 and self.dataset.in_memory:
            for idx, fl in zip(indices, flips):
                yield self.dataset.get_batch(idx, fl)
            return
        keys = [list(zip(i.tolist(), f.tolist())) for i, f in zip(indices, flips)]
        loader = DataLoader(self.dataset, batch_sampler=keys, num_workers=self.num_workers, pin_memory=False)
        try:
            for x, y in loader:
                yield x, self.dataset.batch_condition(y)
        except DyditError as e:
            # A worker's error comes back as "Caught DyditError in DataLoader worker ..." followed by
            # the worker's traceback; keep the original message (its last line) for the one-line report.
            text = str(e)
            if "Original Traceback" not in text:
                raise
            raise DyditError(text.rstrip().splitlines()[-1].partition("Error: ")[2] or text) from None

    def __iter__(self) -> Iterator[tuple[Tensor, Condition]]:
        while True:
            for x, y in self._epoch_batches(self.epoch, self.batch):
                # Advance the position before handing the batch out: the stored state always names
                # the next batch to train on.
                self.batch += 1
                if self.batch == self.batches_per_epoch:
                    self.epoch, self.batch = self.epoch + 1, 0
                yield x, as_condition(y, self.null_class)
