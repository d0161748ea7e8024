"""Progress of the command-line stages: a bar on a terminal, a few plain lines anywhere else.

    for batch in progress(batches, desc="classifier epoch 1/1", unit="batch"):
        ...
    with progress(total=n_tokens, desc="tokenizing", unit="tok") as bar:
        bar.update(len(ids))

On a terminal this is tqdm's bar. Anywhere else (CI, ``make models > log``) a bar would write a
carriage-return frame at every refresh, thousands of them in a log; there, one line is written each
time another ``every`` (5%) of the total is done, and one when it ends:

    lm: 40/200 step (20%), 12.5 s, loss=4.101

``TQDM_DISABLE=1`` in the environment (the test suite sets it) turns both off, as it does tqdm.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any


def is_terminal(stream: IO | None = None) -> bool:
    """Whether ``stream`` (default: standard error) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True, stream: IO | None = None, every: float = 0.05):
    """A bar (tqdm) on a terminal, else :class:`Lines`; nothing at all when not ``enabled``.

    Either wraps ``iterable`` or counts ``update(n)`` calls up to ``total``; ``set_postfix(**values)``
    adds values to the bar or the next line; use it as a context manager or ``close()`` it."""
    stream = sys.stderr if stream is None else stream
    enabled = enabled and os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true", "yes")
    if enabled and is_terminal(stream):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, disable=False)
    return Lines(iterable, total=total, desc=desc, unit=unit, stream=stream if enabled else None, every=every)


class Lines:
    """tqdm's interface (iteration, ``update``, ``set_postfix``, ``close``) writing whole lines: one
    each time ``every`` of the total is passed, one at the end (only that one without a total)."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", stream: IO | None = None, every: float = 0.05):
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit, self.stream = iterable, total, desc, unit, stream
        self.n, self.postfix = 0, ""
        self._steps, self._step = max(1, round(1 / every)), 0  # a line per step of total / _steps
        self._written, self._closed = -1, False
        self._started = time.perf_counter()

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        step = self.n * self._steps // self.total if self.total else 0
        if step > self._step and self.n < self.total:
            self._step = step
            self._write()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        if not self._closed and self.n != self._written:
            self._write()
        self._closed = True

    def _write(self) -> None:
        self._written = self.n
        if self.stream is None:
            return
        done = f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)" if self.total else \
            f"{self.n} {self.unit}"
        parts = [f"{self.desc}: {done}" if self.desc else done, f"{time.perf_counter() - self._started:.1f} s"]
        self.stream.write(", ".join(parts + ([self.postfix] if self.postfix else [])) + "\n")
        self.stream.flush()
