"""The one seeded walk over training items that every stage's batches take.

Each epoch visits the ``count`` items (pretraining windows, packed SFT rows, preference pairs, image
samples) in a new order drawn from (seed, epoch). With several processes, rank r takes items r,
r + world_size, ... of that order: no two ranks share an item and all take the same number. The
position is (epoch, cursor): ``state_dict`` saves it, and a run resumed from it reads the very same
batches it would have read without stopping; saved with another number of processes, it continues
from the same point of the epoch (rounded down to a whole step).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class SeededWalk:
    """An endless, seeded, resumable walk over ``count`` training items in batches, sharded across
    processes like the pretraining windows (rank r takes items r, r + world_size, ... of each epoch's
    shuffled order). Subclasses turn the picked indices into a batch."""

    def __init__(
        self, count: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1, what: str = "packed rows"
    ):
        self.count, self.batch_size, self.seed, self.rank, self.world_size = count, batch_size, seed, rank, world_size
        self.what = what
        self.per_rank = count // world_size
        if self.per_rank == 0:
            raise ValueError(f"{count} {what} are too few for {world_size} process(es): add data")
        self.epoch, self.cursor = 0, 0
        self.order = self._rank_order(0)

    def _rank_order(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.count)
        return order[self.rank :: self.world_size][: self.per_rank]

    def next_picks(self) -> list[int]:
        picks = []
        for _ in range(self.batch_size):
            if self.cursor == self.per_rank:
                self.epoch, self.cursor = self.epoch + 1, 0
                self.order = self._rank_order(self.epoch)
            picks.append(int(self.order[self.cursor]))
            self.cursor += 1
        return picks

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "rows": self.count, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["rows"] != self.count:
            raise ValueError(
                f"the saved data position is for {state['rows']} {self.what}, this data has {self.count}; "
                "resume with the same data and settings"
            )
        self.epoch = state["epoch"]
        self.cursor = min(state["cursor"] * state["world_size"] // self.world_size, self.per_rank)
        self.order = self._rank_order(self.epoch)


class Batches(SeededWalk):
    """Trainer batches along the walk: ``collate(picks)`` makes each step's batch from the indices of
    the items picked for it (packed rows, preference pairs, image samples)."""

    def __init__(
        self,
        count: int,
        batch_size: int,
        collate: Callable[[list[int]], dict],
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        what: str = "packed rows",
    ):
        super().__init__(count, batch_size, seed=seed, rank=rank, world_size=world_size, what=what)
        self.collate = collate

    @classmethod
    def for_run(cls, count: int, collate: Callable[[list[int]], dict], train, dist, what: str) -> Batches:
        """The batches of one training run: ``train``'s batch size and seed, this process's share of
        the items (``dist``: its rank among world_size processes)."""
        return cls(
            count, train.batch_size, collate, seed=train.seed, rank=dist.rank, world_size=dist.world_size, what=what
        )

    def next_batch(self) -> dict:
        return self.collate(self.next_picks())
