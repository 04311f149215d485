"""Turns SIGTERM and SIGINT into exceptions so that `with` blocks end their workers.

Python's default SIGTERM disposition kills the process without unwinding; a
scheduler's `kill` would then skip every cleanup. Inside
`graceful_termination()`, SIGTERM raises `Terminated` (a `SystemExit` with
status 143) in the main thread instead, and SIGINT raises `KeyboardInterrupt`
at once, also inside `asyncio.run`, which would otherwise only cancel its task
at the task's next `await`. A program catches either to say where it stopped.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

SIGINT_EXIT_CODE = 128 + signal.SIGINT
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


class Terminated(SystemExit):
  """SIGTERM arrived; exits with status 143 unless a program catches it."""


def _raise_terminated(signum, frame) -> None:
  del frame
  raise Terminated(128 + signum)


def _raise_interrupt(signum, frame) -> None:
  del signum, frame
  raise KeyboardInterrupt


def interruption_exit_code(error: BaseException) -> int:
  """The conventional exit status for a `KeyboardInterrupt` or `Terminated`: 130 or 143."""
  return SIGTERM_EXIT_CODE if isinstance(error, Terminated) else SIGINT_EXIT_CODE


@contextlib.contextmanager
def graceful_termination() -> Iterator[None]:
  """Raises `Terminated` on SIGTERM and `KeyboardInterrupt` on SIGINT inside the block.

  A SIGINT that the process ignores (a background job of a shell script) stays
  ignored.
  """
  previous_term = signal.signal(signal.SIGTERM, _raise_terminated)
  previous_int = signal.getsignal(signal.SIGINT)
  if previous_int is signal.default_int_handler:
    signal.signal(signal.SIGINT, _raise_interrupt)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous_term)
    if previous_int is signal.default_int_handler:
      signal.signal(signal.SIGINT, previous_int)
