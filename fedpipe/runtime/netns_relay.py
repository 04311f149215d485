"""Runs a TFF worker inside a private network namespace, reachable only by a unix socket.

This program is started by `fedpipe.runtime.isolated_worker.IsolatedWorker` through
`unshare --net`, so it begins in a fresh network namespace whose only
interface is a loopback that is still down. It then

1. brings the loopback up and checks that no other interface exists;
2. starts TFF's `worker_binary` on 127.0.0.1 of that namespace (the binary
   listens on every interface of its namespace, which here is only `lo`),
   with `--confine_filesystem` confined by `fedpipe.runtime.worker_sandbox`: its own
   PID and mount namespaces, a root with only the data directory (read-only)
   and what the binary needs, no capabilities, uid 65534;
3. accepts connections on a unix socket (mode 0600) and relays each one, byte
   for byte, to the worker's TCP port.

Nothing on any network can reach the worker; a caller needs filesystem access
to the socket. The worker dies with this relay (parent-death signal), and the
relay dies with the program that started it.

Not a user entrypoint: the parent passes every argument.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import BinaryIO

from absl import app, flags, logging

from fedpipe.runtime import process_lifetime, worker_sandbox

_SOCKET = flags.DEFINE_string('socket', None, 'Unix socket path to serve on.')
_WORKER_BINARY = flags.DEFINE_string('worker_binary', None, 'TFF worker_binary path.')
_WORKER_CWD = flags.DEFINE_string('worker_cwd', None, 'Working directory of the worker.')
_WORKER_LOG = flags.DEFINE_string('worker_log', None, 'File for the worker output.')
_PORT = flags.DEFINE_integer('port', 8000, 'Worker port inside the private namespace.')
_MAX_CONCURRENT = flags.DEFINE_integer('max_concurrent_computation_calls', -1, 'Worker flag.')
_MAX_MESSAGE_MB = flags.DEFINE_integer('grpc_max_message_length_megabytes', 2000, 'Worker flag.')
_READY_FD = flags.DEFINE_integer('ready_fd', -1, 'File descriptor to report readiness on.')
_CONFINE_FILESYSTEM = flags.DEFINE_bool(
  'confine_filesystem', True, 'Confine the worker to its data directory (worker_sandbox).'
)
_SANDBOX_ROOT = flags.DEFINE_string(
  'sandbox_root',
  None,
  'Directory to create and mount the confined root over; default: `root` next to the socket.',
)
_REQUIRE_ISOLATION = flags.DEFINE_bool(
  'require_isolation', True, 'Refuse to run if any interface but lo exists.'
)
_START_TIMEOUT_S = 180.0
_CHUNK = 1 << 20

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def bring_loopback_up() -> None:
  """Brings up `lo` in the current network namespace (needs CAP_NET_ADMIN there)."""
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    request = struct.pack('16sH22x', b'lo', 0)
    flags_now = struct.unpack('16sH22x', fcntl.ioctl(s, _SIOCGIFFLAGS, request))[1]
    fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack('16sH22x', b'lo', flags_now | _IFF_UP))


def _check_isolated() -> None:
  names = sorted(name for _, name in socket.if_nameindex())
  if names != ['lo']:
    raise RuntimeError(f'network namespace is not private: interfaces {names}; expected only lo')


def _wait_for_port(port: int, worker: subprocess.Popen) -> None:
  deadline = time.monotonic() + _START_TIMEOUT_S
  while time.monotonic() < deadline:
    if worker.poll() is not None:
      raise RuntimeError(
        f'worker_binary exited with code {worker.returncode} before serving;'
        f' see {_WORKER_LOG.value}'
      )
    try:
      with socket.create_connection(('127.0.0.1', port), timeout=1.0):
        return
    except OSError:
      time.sleep(0.05)
  raise RuntimeError(f'worker_binary did not listen within {_START_TIMEOUT_S:.0f}s')


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
  try:
    while data := await reader.read(_CHUNK):
      writer.write(data)
      await writer.drain()
    if writer.can_write_eof():
      writer.write_eof()
  except (ConnectionError, OSError):
    pass


async def _relay_connection(
  port: int, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
) -> None:
  try:
    worker_reader, worker_writer = await asyncio.open_connection('127.0.0.1', port)
  except OSError as e:
    logging.error('relay: cannot reach worker: %s', e)
    client_writer.close()
    return
  try:
    await asyncio.gather(_pump(client_reader, worker_writer), _pump(worker_reader, client_writer))
  finally:
    for w in (client_writer, worker_writer):
      w.close()


async def _serve(socket_path: str, port: int, worker: subprocess.Popen, ready_fd: int) -> int:
  old_umask = os.umask(0o177)
  try:
    server = await asyncio.start_unix_server(
      lambda r, w: _relay_connection(port, r, w), path=socket_path, limit=_CHUNK
    )
  finally:
    os.umask(old_umask)
  os.chmod(socket_path, 0o600)
  stop = asyncio.Event()
  loop = asyncio.get_running_loop()
  for sig in (signal.SIGTERM, signal.SIGINT):
    loop.add_signal_handler(sig, stop.set)
  if ready_fd >= 0:
    os.write(ready_fd, b'ready\n')
    os.close(ready_fd)
  logging.info('relay: serving %s -> 127.0.0.1:%d', socket_path, port)
  async with server:
    while not stop.is_set():
      if worker.poll() is not None:
        logging.error('relay: worker exited with code %s', worker.returncode)
        return 3
      try:
        await asyncio.wait_for(stop.wait(), timeout=0.5)
      except TimeoutError:
        pass
  return 0


def _report_failure(ready_fd: int, message: str) -> None:
  logging.error('relay: %s', message)
  if ready_fd >= 0:
    try:
      os.write(ready_fd, f'error: {message}\n'.encode())
      os.close(ready_fd)
    except OSError:
      pass


def _start_worker(command: list[str], log: BinaryIO) -> subprocess.Popen:
  """Starts the worker, confined unless `--noconfine_filesystem`.

  Args:
    command: The worker's argv.
    log: Where its output goes.

  Returns:
    The worker process.

  Raises:
    worker_sandbox.SandboxError: If the worker cannot be confined.
  """
  if not _CONFINE_FILESYSTEM.value:
    return subprocess.Popen(
      command,
      cwd=_WORKER_CWD.value,
      stdin=subprocess.DEVNULL,
      stdout=log,
      stderr=log,
      preexec_fn=process_lifetime.die_with_parent_hook(os.getpid()),
    )
  staging = _SANDBOX_ROOT.value or os.path.join(os.path.dirname(_SOCKET.value), 'root')
  try:
    os.mkdir(staging, 0o700)
    sandbox = worker_sandbox.prepare(
      staging_dir=staging, data_dir=_WORKER_CWD.value, executable=command[0]
    )
  except OSError as e:
    raise worker_sandbox.SandboxError(str(e)) from e
  try:
    hook = sandbox.preexec_hook()
    # Nothing may fork between these two lines: the first child is the namespace's init.
    worker_sandbox.enter_pid_namespace()
    return subprocess.Popen(
      [sandbox.inside_executable] + command[1:],
      env=dict(os.environ, TMPDIR=worker_sandbox.SCRATCH_DIR_INSIDE),
      stdin=subprocess.DEVNULL,
      stdout=log,
      stderr=log,
      preexec_fn=hook,
    )
  except (OSError, subprocess.SubprocessError) as e:
    raise worker_sandbox.SandboxError(sandbox.read_error() or str(e)) from e
  finally:
    sandbox.close()


def main(argv: list[str]) -> int:
  del argv
  ready_fd = _READY_FD.value
  try:
    if _REQUIRE_ISOLATION.value:
      bring_loopback_up()
      _check_isolated()
  except (OSError, RuntimeError) as e:
    _report_failure(ready_fd, f'cannot set up the private network namespace: {e}')
    return 2
  command = [
    _WORKER_BINARY.value,
    f'--port={_PORT.value}',
    f'--max_concurrent_computation_calls={_MAX_CONCURRENT.value}',
    f'--grpc_max_message_length_megabytes={_MAX_MESSAGE_MB.value}',
  ]
  with open(_WORKER_LOG.value, 'ab') as log:
    try:
      worker = _start_worker(command, log)
    except worker_sandbox.SandboxError as e:
      _report_failure(ready_fd, f'{worker_sandbox.CONFINEMENT_FAILED}: {e}')
      return 2
  code = 1
  try:
    _wait_for_port(_PORT.value, worker)
    code = asyncio.run(_serve(_SOCKET.value, _PORT.value, worker, ready_fd))
  except RuntimeError as e:
    _report_failure(ready_fd, str(e))
  finally:
    if worker.poll() is None:
      # As the init of its PID namespace the worker ignores SIGTERM; it keeps no state.
      worker.kill()
      worker.wait()
    try:
      os.unlink(_SOCKET.value)
    except FileNotFoundError:
      pass
  return code


if __name__ == '__main__':
  flags.mark_flags_as_required(['socket', 'worker_binary', 'worker_cwd', 'worker_log'])
  app.run(lambda argv: sys.exit(main(argv)))
