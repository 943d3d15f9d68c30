"""``frozen``: the foundation model is frozen; only the decode head (learned queries) trains."""

from __future__ import annotations

from rein.methods.base import TuningMethod

__all__ = ["FrozenMethod"]


class FrozenMethod(TuningMethod):
    """The paper's frozen-backbone baseline: no adapter at all."""

    name = "frozen"
