"""A TFF C++ worker that no network can reach, owned by the process that starts it.

TFF 0.87's `worker_binary` listens on every interface with no authentication:
whoever reaches its port can run any TensorFlow graph on the host. fedpipe
therefore never starts it in the host's network namespace. `IsolatedWorker`
starts it inside a private, loopback-only network namespace (`unshare
--net`) behind a unix socket that only this user can open, and ties its
lifetime to the starting process: it is ended on normal exit, on exceptions,
on Ctrl-C and SIGTERM (callers use it as a context manager), and by the
kernel when the starting process is killed outright.

The worker is also confined to its data: `fedpipe.runtime.worker_sandbox` runs it in
its own mount and PID namespaces, where the only files are its working
directory (read-only), a scratch tmpfs and what the binary needs, as uid
65534 with no capabilities. Computations cannot read the host's files (the
silo's TLS key, /etc) nor write into the data.

Where no private namespace can be made (no root, unprivileged user
namespaces disabled), `start()` raises `WorkerIsolationError`; only an
explicit `allow_exposed=True` then runs the worker on a host port (and
unconfined). Where the network namespace works but the filesystem cannot be
confined, `start()` raises `WorkerIsolationError` unless
`allow_unconfined_filesystem=True`.

The worker's private temporary directory (its socket; its log unless
`log_path` is given) is removed when it stops. The directory of a process
that was killed outright is removed by the next `start()` on the host.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from types import TracebackType

from absl import logging

from fedpipe.errors import FedpipeError
from fedpipe.runtime import process_lifetime, worker_sandbox

_READY_TIMEOUT_S = 240.0
_STOP_TIMEOUT_S = 10.0
_TMPDIR_PREFIX = 'fedpipe-worker-'
# fedpipe-worker-<owner pid>-<owner start time in clock ticks>-<random>
_TMPDIR_RE = re.compile(r'fedpipe-worker-(\d+)-(\d+)-[a-z0-9_]+')
# Directories of fedpipe before owners were recorded: fedpipe-worker-<random>.
_LEGACY_TMPDIR_RE = re.compile(r'fedpipe-worker-[a-z0-9_]{8}')
_LEGACY_TMPDIR_MIN_AGE_S = 900.0
_MAX_UNIX_SOCKET_PATH = 107
# `max_concurrent_computation_calls` values: two per available CPU core; no limit.
TWO_PER_CORE = 0
NO_LIMIT = -1


def resolve_concurrent_calls(value: int) -> int:
  """The `worker_binary` concurrency for a configured value.

  The default is TFF's: every client of a round at once. It suits many small
  clients, whose time is mostly fixed per-call latency that overlaps; large
  clients contend instead, and `TWO_PER_CORE` is for those (the round-cost
  and scale benchmarks measure both side by side: benchmarks/RESULTS.md).

  Args:
    value: `TWO_PER_CORE` (0) for two per CPU core this process may use; a
      negative value (`NO_LIMIT`) for no limit; otherwise the limit itself.

  Returns:
    The value for `--max_concurrent_computation_calls` (-1: no limit).
  """
  if value == TWO_PER_CORE:
    return 2 * len(os.sched_getaffinity(0))
  return -1 if value < 0 else value


class WorkerIsolationError(FedpipeError, RuntimeError):
  """The TFF worker cannot be isolated from the network on this host."""


class WorkerConfinementError(WorkerIsolationError):
  """The TFF worker cannot be confined to its working directory on this host."""


class WorkerStartError(FedpipeError, RuntimeError):
  """The TFF worker process did not start serving."""


def _process_start_time(pid: int) -> int | None:
  """The start time (clock ticks after boot) of a live process; None if none."""
  try:
    with open(f'/proc/{pid}/stat', 'rb') as f:
      fields = f.read().rsplit(b')', 1)[1].split()
  except (FileNotFoundError, ProcessLookupError, IndexError):
    return None
  if fields[0] == b'Z':
    return None
  return int(fields[19])


def _socket_accepts(path: str) -> bool:
  with socket.socket(socket.AF_UNIX) as s:
    try:
      s.connect(path)
    except OSError:
      return False
  return True


def remove_stale_tmpdirs(tmp_root: str | None = None) -> list[str]:
  """Removes worker directories whose owning process is gone.

  A directory is stale when the process named in it is not alive, or a
  process with that pid started at another time (pid reuse). Directories of
  older fedpipe versions, which name no owner, are stale when this user owns
  them, nothing listens on their socket and they are older than 15 minutes.

  Args:
    tmp_root: Where to look; default: `tempfile.gettempdir()`.

  Returns:
    The directories removed.
  """
  tmp_root = tmp_root or tempfile.gettempdir()
  removed = []
  try:
    entries = list(os.scandir(tmp_root))
  except OSError:
    return removed
  now = time.time()
  for entry in entries:
    if not entry.name.startswith(_TMPDIR_PREFIX):
      continue
    try:
      st = entry.stat(follow_symlinks=False)
    except OSError:
      continue
    if not entry.is_dir(follow_symlinks=False) or st.st_uid != os.geteuid():
      continue
    match = _TMPDIR_RE.fullmatch(entry.name)
    if match:
      pid, started = int(match.group(1)), int(match.group(2))
      if _process_start_time(pid) == started:
        continue
    elif not _LEGACY_TMPDIR_RE.fullmatch(entry.name) or (
      now - st.st_mtime < _LEGACY_TMPDIR_MIN_AGE_S
      or _socket_accepts(os.path.join(entry.path, 'worker.sock'))
    ):
      continue
    shutil.rmtree(entry.path, ignore_errors=True)
    removed.append(entry.path)
  return removed


def worker_binary_path() -> str:
  """Returns the path of the `worker_binary` shipped in the TFF wheel.

  Raises:
    WorkerStartError: If the installed TFF has no worker binary.
  """
  import importlib.util

  spec = importlib.util.find_spec('tensorflow_federated')
  if spec is None or not spec.submodule_search_locations:
    raise WorkerStartError('tensorflow_federated is not installed; run `make install`.')
  path = os.path.join(list(spec.submodule_search_locations)[0], 'data', 'worker_binary')
  if not os.access(path, os.X_OK):
    raise WorkerStartError(f'TFF worker binary missing or not executable: {path}')
  return path


def _unshare_command() -> list[str]:
  unshare = shutil.which('unshare')
  if unshare is None:
    raise WorkerIsolationError(
      'cannot isolate the TFF worker: the `unshare` command (util-linux) is '
      'not installed. Install util-linux, or allow an exposed worker '
      'explicitly (--config.runtime.allow_exposed_worker=true; the worker then '
      'listens unauthenticated on all interfaces of this host).'
    )
  if os.geteuid() == 0:
    return [unshare, '--net']
  return [unshare, '--map-root-user', '--net']


class IsolatedWorker:
  """A TFF `worker_binary` in a private network namespace behind a unix socket.

  Use as a context manager; `target` is a gRPC target (`unix:///...`).
  """

  def __init__(
    self,
    *,
    working_dir: str | None,
    log_path: str | None = None,
    max_concurrent_computation_calls: int = NO_LIMIT,
    grpc_max_message_length_megabytes: int = 2000,
    allow_exposed: bool = False,
    allow_unconfined_filesystem: bool = False,
  ):
    """Configures, but does not start, a worker.

    Args:
      working_dir: The worker's working directory; relative paths inside
        computations (client datasets) resolve against it. None: an empty
        directory of its own, removed with it (a worker that holds no data).
      log_path: Where the worker's and relay's output goes. Defaults to a file
        in the worker's private temporary directory, removed with it when the
        worker stops.
      max_concurrent_computation_calls: How many computations (clients) the
        worker runs at once; see `resolve_concurrent_calls` (default: no
        limit, as TFF).
      grpc_max_message_length_megabytes: Passed to `worker_binary`.
      allow_exposed: If isolation is impossible, run the worker on a host port
        (reachable by anyone who can reach this host) instead of failing.
        Such a worker is not confined to its working directory either.
      allow_unconfined_filesystem: If the worker cannot be confined to its
        working directory (see `fedpipe.runtime.worker_sandbox`), run it with the
        relay's view of the filesystem and privileges instead of failing.
    """
    if working_dir is not None and not os.path.isdir(working_dir):
      raise FileNotFoundError(f'worker working directory does not exist: {working_dir}')
    self._working_dir = os.path.abspath(working_dir) if working_dir is not None else None
    self._empty_working_dir = working_dir is None
    self._log_path = log_path
    self._owns_log = False
    self._max_concurrent = resolve_concurrent_calls(max_concurrent_computation_calls)
    self._max_message_mb = grpc_max_message_length_megabytes
    self._allow_exposed = allow_exposed
    self._allow_unconfined = allow_unconfined_filesystem
    self._process: subprocess.Popen | None = None
    self._tmpdir: str | None = None
    self._target: str | None = None
    self.exposed = False
    self.confined = False

  @property
  def target(self) -> str:
    if self._target is None:
      raise WorkerStartError('the worker is not started')
    return self._target

  @property
  def pid(self) -> int | None:
    return self._process.pid if self._process else None

  @property
  def log_path(self) -> str | None:
    return self._log_path

  def is_alive(self) -> bool:
    return self._process is not None and self._process.poll() is None

  def start(self) -> str:
    """Starts the worker and waits until it serves.

    Returns:
      The gRPC target of the worker.

    Raises:
      WorkerConfinementError: If the worker cannot be confined to its working
        directory and that was not allowed.
      WorkerIsolationError: If the worker cannot be isolated and exposure was
        not allowed.
      WorkerStartError: If the worker does not come up.
    """
    if self._process is not None:
      return self.target
    remove_stale_tmpdirs()
    pid = os.getpid()
    self._tmpdir = tempfile.mkdtemp(prefix=f'{_TMPDIR_PREFIX}{pid}-{_process_start_time(pid)}-')
    os.chmod(self._tmpdir, 0o700)
    if self._empty_working_dir:
      self._working_dir = os.path.join(self._tmpdir, 'empty')
      os.mkdir(self._working_dir, 0o755)
    if self._log_path is None or self._owns_log:
      self._log_path = os.path.join(self._tmpdir, 'worker.log')
      self._owns_log = True
    try:
      self._target = self._start_isolated()
    except WorkerConfinementError:
      self.stop()
      raise
    except WorkerIsolationError:
      if not self._allow_exposed:
        self.stop()
        raise
      logging.warning(
        'SECURITY: starting the TFF worker on a host port WITHOUT network '
        'isolation or authentication, as explicitly allowed.'
      )
      self._target = self._start_exposed()
      self.exposed = True
    except BaseException:
      self.stop()
      raise
    return self._target

  def _spawn(
    self,
    command: list[str],
    *,
    cwd: str | None = None,
    pass_fds: tuple[int, ...] = (),
  ) -> None:
    # The relay imports this package: give it our import path.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    log = open(self._log_path, 'ab')
    try:
      self._process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        pass_fds=pass_fds,
        start_new_session=True,
        preexec_fn=process_lifetime.die_with_parent_hook(os.getpid()),
      )
    finally:
      log.close()

  def _worker_flags(self) -> list[str]:
    return [
      f'--max_concurrent_computation_calls={self._max_concurrent}',
      f'--grpc_max_message_length_megabytes={self._max_message_mb}',
    ]

  def _start_isolated(self) -> str:
    try:
      target = self._start_relay(confine=True)
      self.confined = True
      return target
    except WorkerConfinementError as e:
      if not self._allow_unconfined:
        raise
      logging.warning(
        'SECURITY: starting the TFF worker with the filesystem view and privileges of '
        'its relay, as explicitly allowed: %s',
        e,
      )
    return self._start_relay(confine=False)

  def _start_relay(self, *, confine: bool) -> str:
    socket_path = os.path.join(self._tmpdir, 'worker.sock')
    if len(socket_path) > _MAX_UNIX_SOCKET_PATH:
      raise WorkerStartError(
        f'worker socket path {socket_path} is longer than {_MAX_UNIX_SOCKET_PATH} bytes; '
        'set TMPDIR to a shorter directory.'
      )
    read_fd, write_fd = os.pipe()
    command = (
      _unshare_command()
      + [
        sys.executable,
        '-m',
        'fedpipe.runtime.netns_relay',
        f'--socket={socket_path}',
        f'--worker_binary={worker_binary_path()}',
        f'--worker_cwd={self._working_dir}',
        f'--worker_log={self._log_path}',
        f'--ready_fd={write_fd}',
        f'--confine_filesystem={str(confine).lower()}',
      ]
      + self._worker_flags()
    )
    try:
      self._spawn(command, pass_fds=(write_fd,))
    finally:
      os.close(write_fd)
    message = self._read_ready(read_fd)
    if message == 'ready':
      return f'unix://{socket_path}'
    self._reap()
    if message.startswith(worker_sandbox.CONFINEMENT_FAILED):
      raise WorkerConfinementError(
        f'{message}. Confining the worker needs Linux >= 5.12 and root or unprivileged '
        'user namespaces; as root, also a working directory on a filesystem with '
        'ID-mapped mounts (ext4, xfs, btrfs, tmpfs; not NFS) or owned by uid 65534. '
        'Otherwise allow an unconfined worker explicitly '
        '(fedpipe-silo --allow_unconfined_worker, --config.runtime.allow_unconfined_worker'
        '=true; every approved computation '
        'can then read every file the silo process can read).'
      )
    if 'private network namespace' in message or 'unshare' in message or not message:
      raise WorkerIsolationError(
        'cannot start the TFF worker in a private network namespace '
        f'({message or self.log_tail()}). Run as root, or enable '
        'unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1'
        ' / user.max_user_namespaces>0), or allow an exposed worker explicitly '
        '(--config.runtime.allow_exposed_worker=true; it then listens '
        'unauthenticated on all interfaces of this host).'
      )
    raise WorkerStartError(f'TFF worker did not start: {message}; log: {self._log_path}')

  def _read_ready(self, read_fd: int) -> str:
    chunks = []
    deadline = time.monotonic() + _READY_TIMEOUT_S
    try:
      while True:
        if time.monotonic() > deadline:
          return f'no answer within {_READY_TIMEOUT_S:.0f}s'
        ready, _, _ = select.select([read_fd], [], [], 0.5)
        if ready:
          data = os.read(read_fd, 4096)
          if not data:
            break
          chunks.append(data)
          if b'\n' in data:
            break
        elif self._process.poll() is not None:
          break
    finally:
      os.close(read_fd)
    text = b''.join(chunks).decode(errors='replace').strip()
    return text.removeprefix('error: ')

  def _start_exposed(self) -> str:
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
    self._spawn(
      [worker_binary_path(), f'--port={port}'] + self._worker_flags(),
      cwd=self._working_dir,
    )
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
      if self._process.poll() is not None:
        raise WorkerStartError(f'TFF worker exited; log: {self._log_path}')
      try:
        with socket.create_connection(('127.0.0.1', port), timeout=1.0):
          return f'localhost:{port}'
      except OSError:
        time.sleep(0.1)
    raise WorkerStartError(f'TFF worker did not listen on port {port}')

  def log_tail(self, lines: int = 5) -> str:
    """The last `lines` lines of the worker's log, joined by ' | ' ('' if none)."""
    try:
      with open(self._log_path, 'rb') as f:
        return ' | '.join(f.read().decode(errors='replace').strip().splitlines()[-lines:])
    except OSError:
      return ''

  def _reap(self) -> None:
    process, self._process = self._process, None
    if process is None:
      return
    if process.poll() is None:
      try:
        os.killpg(process.pid, signal.SIGTERM)
      except ProcessLookupError:
        pass
      try:
        process.wait(timeout=_STOP_TIMEOUT_S)
      except subprocess.TimeoutExpired:
        pass
    # Whatever is left in the group (the worker, if the relay died first).
    try:
      os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass
    if process.poll() is None:
      process.wait()

  def stop(self) -> None:
    """Ends the worker and its relay and removes its temporary directory.

    Safe to call more than once. A log in that directory (no `log_path`
    given) goes with it.
    """
    self._reap()
    self._target = None
    if self._tmpdir:
      shutil.rmtree(self._tmpdir, ignore_errors=True)
      self._tmpdir = None

  def __enter__(self) -> IsolatedWorker:
    self.start()
    return self

  def __exit__(
    self,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
  ) -> None:
    self.stop()
