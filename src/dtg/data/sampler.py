"""An infinite, seeded, resumable, rank-aware sampler of mixed labeled/unlabeled batches.

Each source (labeled, unlabeled) is an endless stream of indices: the
concatenation of seeded permutations ("passes") of that source. Rank ``r`` of
``W`` takes every ``W``-th element of the stream starting at ``r``, so ranks
draw disjoint positions of one global stream. Every batch holds exactly
``n_labeled`` labeled and ``n_unlabeled`` unlabeled items; there is no epoch
length. The state is just the number of batches drawn, so a resumed sampler
continues the same sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

LABELED = 0
UNLABELED = 1


@dataclass(frozen=True)
class SampleKey:
    """One item of a batch: which source, which index, and the seed of its augmentation."""

    source: int  # LABELED or UNLABELED
    index: int
    seed: int


class _Permutations:
    """Cache of the current pass's permutation, so drawing is O(1) amortised."""

    def __init__(self, size: int, seed: int, source: int) -> None:
        self.size, self.seed, self.source = size, seed, source
        self._pass = -1
        self._perm: list[int] = []

    def __call__(self, position: int) -> int:
        pass_idx, offset = divmod(position, self.size)
        if pass_idx != self._pass:
            # A tuple of ints hashes deterministically across processes (no string hashing).
            gen = torch.Generator().manual_seed(hash((self.seed, self.source, pass_idx)) & 0x7FFF_FFFF_FFFF)
            self._perm = torch.randperm(self.size, generator=gen).tolist()
            self._pass = pass_idx
        return self._perm[offset]


class MixedBatchSampler:
    """Yields lists of :class:`SampleKey`: ``n_labeled`` labeled then ``n_unlabeled`` unlabeled.

    Args:
        num_labeled, num_unlabeled: sizes of the two sources.
        n_labeled, n_unlabeled: items of each source per batch (per rank).
        seed: the sequence depends only on it (and on rank/world size).
        rank, world_size: this process's share of the global stream.
        start_batch: number of batches already drawn (resume).
    """

    def __init__(
        self,
        num_labeled: int,
        num_unlabeled: int,
        n_labeled: int,
        n_unlabeled: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ) -> None:
        if n_labeled > 0 and num_labeled == 0:
            raise ValueError("the labeled set is empty but batches ask for labeled images")
        if n_unlabeled > 0 and num_unlabeled == 0:
            raise ValueError("the unlabeled set is empty but batches ask for unlabeled images")
        if n_labeled + n_unlabeled == 0:
            raise ValueError("a batch must hold at least one image")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.sizes = (num_labeled, num_unlabeled)
        self.per_batch = (n_labeled, n_unlabeled)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batches_drawn = start_batch
        self._perms = [_Permutations(max(n, 1), seed, s) for s, n in enumerate(self.sizes)]

    def _key(self, source: int, batch: int, slot: int) -> SampleKey:
        per = self.per_batch[source]
        position = (batch * per + slot) * self.world_size + self.rank  # global stream position
        index = self._perms[source](position)
        aug_seed = hash((self.seed, source, position)) & 0x7FFF_FFFF
        return SampleKey(source, index, aug_seed)

    def batch(self, batch: int) -> list[SampleKey]:
        """The keys of batch number ``batch`` (pure: does not advance the sampler)."""
        keys = [self._key(LABELED, batch, i) for i in range(self.per_batch[0])]
        return keys + [self._key(UNLABELED, batch, i) for i in range(self.per_batch[1])]

    def __iter__(self) -> Iterator[list[SampleKey]]:
        while True:
            keys = self.batch(self.batches_drawn)
            self.batches_drawn += 1
            yield keys

    def state_dict(self) -> dict:
        return {"batches_drawn": self.batches_drawn, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.batches_drawn = int(state["batches_drawn"])
