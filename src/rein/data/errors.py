"""The one exception type of the data package."""

from __future__ import annotations

__all__ = ["DataError"]

# How torch's ExceptionWrapper.reraise introduces an error from a DataLoader worker.
_WORKER_PREFIX = "Caught "


class DataError(ValueError):
    """A dataset, file or label that cannot be used, with a message naming what and why.

    It crosses the DataLoader worker boundary as itself, with its own message. Torch sends a
    worker's exception to the main process as its type and formatted traceback, and re-raises
    it there as ``type(message=...)`` when the type has a ``message`` attribute (this class
    does), with a 50-line text: "Caught DataError in DataLoader worker process 0. Original
    Traceback ...". The constructor takes the original message back out of that text and adds
    only which worker, so ``rein train`` prints one line. It pickles as ``DataError(message)``.
    """

    def __init__(self, *args: object, message: str | None = None) -> None:
        if message is not None:
            args = (_from_worker_text(message, type(self)),) + args
        super().__init__(*args)

    @property
    def message(self) -> str:
        """The error message (``str(error)``)."""
        return str(self.args[0]) if self.args else ""

    def __reduce__(self):  # type: ignore[override]
        return (type(self), self.args)


def _from_worker_text(text: str, cls: type) -> str:
    """The original message in torch's "Caught X in <where>.\\nOriginal Traceback ..." text."""
    if not text.startswith(_WORKER_PREFIX) or "\nOriginal Traceback" not in text:
        return text
    head, _, tb = text.partition("\nOriginal ")
    where = head[len(_WORKER_PREFIX) :].rstrip(".")
    where = where.split(" ", 1)[1] if " " in where else where  # "in DataLoader worker process 0"
    # The traceback ends with "<module>.<Class>: <message>" (the last exception of a chain).
    marker = f"\n{cls.__module__}.{cls.__qualname__}: "
    cut = tb.rfind(marker)
    if cut < 0:
        marker = f"\n{cls.__qualname__}: "
        cut = tb.rfind(marker)
    if cut < 0:
        return text
    original = tb[cut + len(marker) :].rstrip("\n")
    return f"{original} ({where})" if where else original
