"""SIGTERM as Ctrl-C is: an exception in the main thread, so that a long run keeps what it did before it ends.

SLURM preemption, ``timeout``, ``docker stop`` and torchrun's teardown send SIGTERM, whose default action ends the
process at once, without ``finally`` blocks. :func:`sigterm_exits` raises ``SystemExit(143)`` (128 + 15, the
shell's status for it) instead, for the duration of a ``with`` block in the main thread.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["SIGTERM_STATUS", "sigterm_exits"]

#: The exit status of a run ended by SIGTERM.
SIGTERM_STATUS = 128 + signal.SIGTERM


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """Within the block, SIGTERM raises ``SystemExit(143)`` in the main thread; elsewhere it changes nothing."""

    def handler(signum: int, frame: Any) -> None:  # noqa: ARG001 - the signature signal.signal calls with
        raise SystemExit(SIGTERM_STATUS)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
