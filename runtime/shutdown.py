"""Turns SIGTERM into a normal exit so that `with` blocks end their workers.

Python's default SIGTERM disposition kills the process without unwinding; a
scheduler's `kill` would then skip every cleanup. Inside
`graceful_termination()`, SIGTERM raises `SystemExit(143)` in the main thread
instead, like Ctrl-C raises `KeyboardInterrupt`.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


def _raise_exit(signum, frame) -> None:
  del frame
  raise SystemExit(128 + signum)


@contextlib.contextmanager
def graceful_termination() -> Iterator[None]:
  previous = signal.signal(signal.SIGTERM, _raise_exit)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
