"""Progress output that reads well both in a terminal and in a captured log.

On a terminal, :func:`progress_bar` is a tqdm bar. When the stream is not a terminal (a log file,
a pipe, CI), tqdm's carriage-return redraws would leave thousands of fragments in the log, so
:class:`LineProgress` prints one complete line every few percent instead::

    train rein: 150/600 (25%) 38s elapsed, ETA 1m54s, loss=1.234 lr=1.50e-03

A transient bar (``leave=False``, e.g. one evaluation pass) prints a single line when it ends.
``REIN_PROGRESS=lines`` in the environment asks for lines on a terminal too.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, TextIO, TypeVar

__all__ = ["Progress", "LineProgress", "progress_bar", "progress_iter", "format_seconds"]

T = TypeVar("T")


class Progress(Protocol):
    """What the training, pretraining and evaluation loops use (tqdm has the same methods)."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, **values: Any) -> Any: ...

    def close(self) -> Any: ...


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m07s`` or ``1h02m``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class LineProgress:
    """Progress as whole lines: one each time another ``every_percent`` of ``total`` is done.

    Args:
        total: the number of steps (0 or None: a line every ``every_steps`` steps, no percent).
        desc: what is progressing (the start of every line).
        initial: steps already done (a resumed run).
        stream: where the lines go (default ``sys.stderr``, as tqdm).
        every_percent: percent of ``total`` between two lines.
        leave: False: a transient bar, which prints only one line, when it is closed.
        clock: the time source (tests pass a fake one).
    """

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        initial: int = 0,
        stream: TextIO | None = None,
        every_percent: float = 5.0,
        leave: bool = True,
        every_steps: int = 100,
        clock: Any = time.perf_counter,
    ) -> None:
        if every_percent <= 0:
            raise ValueError(f"every_percent must be positive, got {every_percent}")
        self.total = int(total) if total else 0
        self.desc = desc
        self.n = int(initial)
        self.stream = stream
        self.leave = leave
        self.clock = clock
        self._start_n = self.n
        self._t0 = clock()
        self._postfix = ""
        self._closed = False
        if self.total:
            self._step = max(1, round(self.total * every_percent / 100.0))
        else:
            self._step = max(1, every_steps)
        self._next = (self.n // self._step + 1) * self._step

    def _write(self, line: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        stream.write(line + "\n")
        stream.flush()

    def line(self) -> str:
        """The current state as one line."""
        elapsed = self.clock() - self._t0
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            pct = 100.0 * self.n / self.total
            text = f"{head}{self.n}/{self.total} ({pct:.0f}%) {format_seconds(elapsed)} elapsed"
            done = self.n - self._start_n
            if 0 < done and self.n < self.total:
                eta = elapsed / done * (self.total - self.n)
                text += f", ETA {format_seconds(eta)}"
        else:
            text = f"{head}{self.n} {format_seconds(elapsed)} elapsed"
        if self._postfix:
            text += f", {self._postfix}"
        return text

    def update(self, n: int = 1) -> None:
        """Count ``n`` more steps; print a line when another step of the interval is reached."""
        self.n += n
        if self.n >= self._next:
            self._next = (self.n // self._step + 1) * self._step
            if self.leave:
                self._write(self.line())

    def set_postfix(self, **values: Any) -> None:
        """``key=value`` pairs appended to the next lines (as tqdm's ``set_postfix``)."""
        self._postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        """End: a transient bar prints its one line; a bar stopped early prints where it is."""
        if self._closed:
            return
        self._closed = True
        stopped_between_lines = self.n > self._start_n and self.n % self._step != 0
        if not self.leave or stopped_between_lines:
            self._write(self.line())


def _is_terminal(stream: TextIO | None) -> bool:
    if os.environ.get("REIN_PROGRESS") == "lines":  # e.g. processes sharing one terminal
        return False
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real file
        return False


def progress_bar(
    total: int | None,
    desc: str = "",
    initial: int = 0,
    leave: bool = True,
    stream: TextIO | None = None,
    every_percent: float = 5.0,
) -> Progress:
    """A tqdm bar on a terminal, else a :class:`LineProgress` (a line every few percent)."""
    if _is_terminal(stream):
        from tqdm import tqdm

        return tqdm(
            total=total, initial=initial, desc=desc, leave=leave, file=stream, dynamic_ncols=True
        )
    return LineProgress(total, desc, initial, stream, every_percent, leave)


def progress_iter(
    items: Iterable[T],
    desc: str = "",
    total: int | None = None,
    leave: bool = True,
    stream: TextIO | None = None,
) -> Iterator[T]:
    """Iterate ``items`` with :func:`progress_bar` (``total`` from ``len(items)`` if it has one)."""
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    bar = progress_bar(total, desc, leave=leave, stream=stream)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
