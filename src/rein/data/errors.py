"""The one exception type of the data package."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A dataset, file or label that cannot be used, with a message naming what and why."""
