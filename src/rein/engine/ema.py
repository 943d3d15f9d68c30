"""An exponential moving average of the trainable weights (mmengine ``EMAHook`` semantics).

After every iteration with 0-based index ``it``:

* ``it < begin_iter``: the average is overwritten with the live weights;
* otherwise: ``ema <- ema + momentum * (p - ema)``.

So the average starts from the weights after iteration ``begin_iter - 1`` (SoMA: momentum
0.0002 from iteration 12k). Evaluation and saved checkpoints use the averaged weights
(:meth:`WeightEMA.swapped`); the live weights keep training.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["WeightEMA"]


class WeightEMA:
    """EMA of the parameters of ``model`` that train (``requires_grad``)."""

    def __init__(self, model: nn.Module, momentum: float, begin_iter: int = 0) -> None:
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"train.ema_momentum must be in (0, 1], got {momentum}")
        if begin_iter < 0:
            raise ValueError(f"train.ema_begin_iter must be >= 0, got {begin_iter}")
        self.momentum = float(momentum)
        self.begin_iter = int(begin_iter)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, iteration: int) -> None:
        """Call after the optimizer step of 0-based iteration ``iteration``."""
        for name, p in self.params.items():
            avg = self.shadow[name]
            if iteration < self.begin_iter:
                avg.copy_(p.detach())
            else:
                avg.add_(p.detach() - avg, alpha=self.momentum)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; the live ones come back."""
        live = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(live[n])

    def state_dict(self) -> dict[str, Any]:
        return {
            "momentum": self.momentum,
            "begin_iter": self.begin_iter,
            "shadow": {n: t.clone() for n, t in self.shadow.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow: dict[str, Tensor] = state["shadow"]
        missing = sorted(set(self.shadow) - set(shadow))
        if missing:
            raise ValueError(f"the EMA state lacks {len(missing)} weights, e.g. {missing[0]}")
        for n, t in self.shadow.items():
            t.copy_(shadow[n])
