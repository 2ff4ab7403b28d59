"""An infinite, sharded, resumable sample stream.

The *global stream* is the concatenation of permutations of ``range(dataset_size)``: pass p is
``torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed + p))`` (or ``arange`` without
shuffling). Global position k holds ``perm_{k // size}[k % size]``. Rank r of W takes global positions
r, r + W, r + 2W, ...; so within one pass the ranks' samples are disjoint and together cover the dataset.

``start`` counts samples this rank already consumed: its next global position is ``r + start * W``, found with
integer arithmetic (O(1) in ``start``; only the current pass's permutation is ever built). A sampler made with
``start=k`` therefore yields exactly what an uninterrupted one yields from its k-th element on.

With ``with_positions=True`` the sampler yields ``(index, global_position)`` pairs; `MultiCropDataset` seeds each
sample's augmentation from its global position, which makes augmentations independent of worker scheduling.
"""

from __future__ import annotations

from typing import Iterator, Tuple, Union

import torch


class InfiniteShardedSampler(torch.utils.data.Sampler):
    """Infinite stream of dataset indices for one rank; see the module docstring for the exact order."""

    def __init__(self, dataset_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, start: int = 0,
                 shuffle: bool = True, with_positions: bool = False):
        if dataset_size < 1:
            raise ValueError(f"dataset_size must be >= 1, got {dataset_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.dataset_size = int(dataset_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.start = int(start)
        self.shuffle = bool(shuffle)
        self.with_positions = bool(with_positions)

    def permutation(self, pass_index: int) -> torch.Tensor:
        """The dataset order of pass ``pass_index`` of the global stream."""
        if not self.shuffle:
            return torch.arange(self.dataset_size)
        generator = torch.Generator().manual_seed(self.seed + pass_index)
        return torch.randperm(self.dataset_size, generator=generator)

    def global_position(self, local_position: int) -> int:
        """Global stream position of this rank's ``local_position``-th sample."""
        return self.rank + local_position * self.world_size

    def __iter__(self) -> Iterator[Union[int, Tuple[int, int]]]:
        size, step = self.dataset_size, self.world_size
        position = self.global_position(self.start)
        while True:
            pass_index, offset = divmod(position, size)
            chosen = self.permutation(pass_index)[offset::step].tolist()
            if self.with_positions:
                yield from ((index, position + i * step) for i, index in enumerate(chosen))
            else:
                yield from chosen
            position += len(chosen) * step  # the first position of this rank in a later pass
