"""A fixed random subset of a dataset (RecycleLoRA's ``RandomSubsetDataset``).

RecycleLoRA trains on a random 12,403 of GTAV's 24,966 images: at construction the wrapper
keeps ``sorted(numpy.random.default_rng(seed).choice(N, size=min(num_samples, N),
replace=False))`` of the N samples, in the wrapped dataset's file order, and the training
sampler shuffles within them. With ``seed=None`` the seed is drawn from OS entropy (as the
official code does, which only logs it); :attr:`RandomSubsetDataset.seed` holds the seed
that was used either way, so a caller can record it and rebuild the same subset.

The trainer (``data.train[i].subset`` in a config) draws that seed once on rank 0, sends it
to every rank and stores it in the checkpoint for resuming. The official code draws it in
every process, so under multi-GPU training each process there trains on its own subset;
we deliberately use one subset for all ranks (the sample stream is sharded over one index
space).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from torch.utils.data import Dataset

__all__ = ["RandomSubsetDataset", "draw_subset_seed", "subset_indices"]


def draw_subset_seed() -> int:
    """A fresh seed from OS entropy (a uint32, as the official code draws it)."""
    return int(np.random.SeedSequence().generate_state(1)[0])


def subset_indices(total: int, num_samples: int, seed: int) -> list[int]:
    """``sorted(default_rng(seed).choice(total, min(num_samples, total), replace=False))``."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
    if total < 1:
        raise ValueError("cannot take a subset of an empty dataset")
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(total, size=min(num_samples, total), replace=False))


class RandomSubsetDataset(Dataset):
    """The samples ``indices`` (see :func:`subset_indices`) of ``dataset``, in their order.

    Args:
        dataset: any dataset with ``__len__`` and ``__getitem__``; its ``sample(index,
            transform, rng)`` (the trainer's entry point, see ``SegDataset.sample``) is used
            when it has one.
        num_samples: how many to keep (clipped to ``len(dataset)``).
        seed: the draw's seed; None draws one from OS entropy (:attr:`seed_drawn` is True).
    """

    def __init__(self, dataset: Dataset, num_samples: int, seed: int | None = None) -> None:
        self.dataset = dataset
        self.total = len(dataset)  # type: ignore[arg-type]
        self.seed_drawn = seed is None
        self.seed = draw_subset_seed() if seed is None else int(seed)
        self.num_samples = int(num_samples)
        self.indices = subset_indices(self.total, self.num_samples, self.seed)
        self.name = getattr(dataset, "name", type(dataset).__name__)

    def __len__(self) -> int:
        return len(self.indices)

    def _map(self, index: int) -> int:
        n = len(self.indices)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a subset of size {n}")
        return self.indices[index]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self._map(index)]

    def sample(
        self,
        index: int,
        transform: Callable[..., Any] | None = None,
        rng: np.random.Generator | None = None,
    ) -> Any:
        """Sample ``index`` of the subset through ``transform`` (see ``SegDataset.sample``)."""
        return self.dataset.sample(self._map(index), transform, rng)  # type: ignore[attr-defined]

    def describe(self, how: str | None = None) -> str:
        """One line: what was kept, with which seed (and ``how`` it was chosen)."""
        if how is None:
            how = "drawn from OS entropy" if self.seed_drawn else "given"
        return (
            f"RandomSubsetDataset({self.name}): kept {len(self)}/{self.total} samples, "
            f"seed={self.seed} ({how})"
        )

    def __repr__(self) -> str:
        return (
            f"RandomSubsetDataset({self.dataset!r}, num_samples={self.num_samples}, "
            f"seed={self.seed}, kept={len(self)})"
        )
