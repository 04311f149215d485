"""Ties a child process's lifetime to its parent's (Linux `PR_SET_PDEATHSIG`).

A TFF worker that outlives the program that started it keeps a port (or a
socket) open and holds on to inherited pipes, which hangs test runners. The
kernel can end a child when its parent dies, even by SIGKILL; this module sets
that up from a `subprocess.Popen(preexec_fn=...)` hook.

Kept free of heavy imports: it runs in the relay process inside the worker's
network namespace too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def _libc() -> ctypes.CDLL:
  return ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6', use_errno=True)


def die_with_parent_hook(parent_pid: int, sig: int = signal.SIGKILL) -> Callable[[], None]:
  """Returns a `preexec_fn` that makes the child receive `sig` when its parent dies.

  The death signal fires when the *thread* that forked the child exits, so
  start long-lived children from the main thread.

  Args:
    parent_pid: The pid of the process that starts the child (`os.getpid()`
      before `Popen`). If the parent is already gone when the hook runs, the
      child exits at once instead of running unsupervised.
    sig: The signal the child receives.

  Returns:
    A callable for `subprocess.Popen(preexec_fn=...)`.
  """
  libc = _libc()

  def hook() -> None:
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
      os._exit(126)
    if os.getppid() != parent_pid:
      os._exit(1)

  return hook
