"""Progress of long work: a bar on a terminal, a few plain lines everywhere else (cron, a log file).

Every long loop (tiles embedded, folds, epochs, blocks scored or exported) counts through
:func:`progress`, and every step of a command is announced by :func:`step`. Where stderr is a
terminal the count is a tqdm bar. Elsewhere it is a line on the ``settlements.progress`` logger each
time :data:`LINE_SHARE` more of the work is done (but not within :data:`LINE_GAP_SECONDS` of the last
line: quick work prints none), or :data:`LINE_SECONDS` after the last line when the work is slow, and
one at the end when any came before: a nightly log says how far a run got without filling up.

The command line gives that logger a handler of its own (time-stamped lines on stderr), silent with
``--quiet``; where nothing set it up (the library used from Python) it is silent, like any logger
below WARNING.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar

log = logging.getLogger("settlements.progress")

#: Off a terminal, a progress line each time this share of the work more is done ...
LINE_SHARE = 0.1
#: ... or, when the work is slow, each time this many seconds have passed since the last line ...
LINE_SECONDS = 30.0
#: ... and never sooner than this after the last line (or the start).
LINE_GAP_SECONDS = 2.0

T = TypeVar("T")


def enabled() -> bool:
    """Whether progress is shown at all (the command line's ``--quiet`` turns it off)."""
    return log.isEnabledFor(logging.INFO)


def on_terminal() -> bool:
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def step(text: str, *args: Any) -> None:
    """One line saying a step of a command is done (``olinda: 2/4 embed: ...``); said at the end, so that a
    command stopped by bad input says nothing but its one error line."""
    log.info(text, *args)


def _count(n: float, unit: str) -> str:
    plural = "" if not unit or n == 1 else "es" if unit.endswith(("s", "sh", "ch", "x")) else "s"
    return f"{n:,.0f} {unit}{plural}"


class Progress:
    """A count of ``total`` pieces of work (None: not known), shown as a bar or as a few lines."""

    def __init__(self, total: float | None, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0.0
        self.started = self.last_time = time.monotonic()
        self.last_n = 0.0
        self.bar: Any = None
        if enabled() and on_terminal():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        if not enabled():
            return
        since = time.monotonic() - self.last_time
        if since >= LINE_SECONDS:
            self._line()
        elif self.total and since >= LINE_GAP_SECONDS and self.n - self.last_n >= LINE_SHARE * self.total - 1e-9:
            self._line()
        elif self.total and self.n >= self.total > self.last_n > 0:  # the end, where a line said it had begun
            self._line()

    def _line(self) -> None:
        now = time.monotonic()
        done = f"{self.n / self.total:.0%} ({self.n:,.0f}/{_count(self.total, self.unit)})" if self.total else \
            _count(self.n, self.unit)
        log.info("%s: %s, %.0f s", self.desc, done, now - self.started)
        self.last_n, self.last_time = self.n, now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def progress(total: float | None, desc: str, unit: str = "") -> Progress:
    """A count of ``total`` pieces of ``unit`` (``with progress(n, "embedding", "tile") as bar: bar.update(k)``)."""
    return Progress(total, desc, unit)


def counted(items: Iterable[T], desc: str, unit: str = "", total: float | None = None) -> Iterator[T]:
    """``items``, counted as they are taken (``total``: their number, where ``len`` cannot tell it)."""
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    with progress(total, desc, unit) as bar:
        for item in items:
            yield item
            bar.update(1)
