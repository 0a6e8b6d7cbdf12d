"""SIGINT and SIGTERM as an exception, so that a command stops cleanly and says so.

The command line installs :func:`handle_signals`: in its process a signal raises :class:`Interrupted`
where the program is, and every ``finally`` on the way out runs (staged files removed, DataLoader
workers stopped, the lock released). Python can swallow that raise when it lands in a finalizer
(``__del__``, a weakref callback); :func:`check`, called where it is safe (each embedded chunk,
before a commit), raises it again, so a swallowed signal never lets a run go on to report success.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from .errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


_main_pid: int | None = None
_received: list[int] = []


def received() -> int | None:
    """The first signal received since :func:`handle_signals` was entered, if any."""
    return _received[0] if _received else None


def check() -> None:
    """Raise :class:`Interrupted` if a signal came (its first raise may have been swallowed)."""
    if _received and os.getpid() == _main_pid:
        raise Interrupted(_received[0])


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _main_pid:  # a forked DataLoader worker: the main process stops it
        if signum == signal.SIGTERM:
            os._exit(128 + signum)
        return
    if _received:  # already on the way out: let the cleanup finish (check() raises again if need be)
        return
    _received.append(signum)
    # DataLoader workers that got the signal too exit; torch's SIGCHLD handler would raise about it
    # in the middle of the cleanup
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    raise Interrupted(signum)


@contextmanager
def handle_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the block (main thread only); restored after."""
    global _main_pid
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _main_pid = os.getpid()
    _received.clear()
    previous = {signum: signal.signal(signum, _on_signal) for signum in SIGNALS}
    hook = sys.unraisablehook
    sys.unraisablehook = _quiet_after_signal(hook)
    try:
        yield
    finally:
        sys.unraisablehook = hook
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _quiet_after_signal(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """Once interrupted, finalizers failing on half-built objects (or swallowing the Interrupted itself)
    print nothing: the interruption is reported once, on one line."""

    def unraisable(info: Any) -> None:
        if not _received:
            hook(info)

    return unraisable
