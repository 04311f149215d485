"""The TFF worker runs unreachable from any network and never outlives its owner."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from runtime import isolated_worker
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  try:  # A zombie is dead for our purposes.
    with open(f'/proc/{pid}/stat') as f:
      return f.read().split(')')[-1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


def _wait_dead(pids, timeout=15.0):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if not any(_alive(p) for p in pids):
      return True
    time.sleep(0.1)
  return False


def _worker_binary_pids():
  out = subprocess.run(['pgrep', '-f', 'tensorflow_federated/data/worker_binary'],
                       capture_output=True, text=True).stdout
  return {int(p) for p in out.split()}


def _listening_tcp_ports():
  """Ports listening in the host network namespace (`ss -ltn`)."""
  out = subprocess.run(['ss', '-ltnH'], capture_output=True, text=True, check=True).stdout
  return {line.split()[3].rsplit(':', 1)[-1] for line in out.splitlines() if line.strip()}


def test_serves_on_a_private_unix_socket_and_no_tcp_port(tmp_path):
  before_ports = _listening_tcp_ports()
  before_workers = _worker_binary_pids()
  with isolated_worker.IsolatedWorker(working_dir=str(tmp_path)) as worker:
    assert worker.target.startswith('unix://')
    path = worker.target[len('unix://'):]
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    new_workers = _worker_binary_pids() - before_workers
    assert new_workers, 'no worker_binary process found'
    # The worker (listening on 8000 in its namespace) adds no host TCP port.
    assert _listening_tcp_ports() - before_ports == set()
    assert '8000' not in _listening_tcp_ports() or '8000' in before_ports
    # The worker's network namespace is not ours.
    host_ns = os.readlink('/proc/self/ns/net')
    for pid in new_workers:
      assert os.readlink(f'/proc/{pid}/ns/net') != host_ns
  assert _wait_dead(new_workers)
  assert not os.path.exists(path)


@pytest.mark.parametrize('configured,expected', [
    (isolated_worker.TWO_PER_CORE, 2 * len(os.sched_getaffinity(0))),
    (isolated_worker.NO_LIMIT, -1),
    (-5, -1),
    (3, 3),
])
def test_worker_runs_the_configured_number_of_clients_at_once(tmp_path, configured, expected):
  assert isolated_worker.resolve_concurrent_calls(configured) == expected
  before = _worker_binary_pids()
  with isolated_worker.IsolatedWorker(working_dir=str(tmp_path),
                                      max_concurrent_computation_calls=configured):
    argvs = []
    for pid in _worker_binary_pids() - before:
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        argvs.append(f.read().decode().split('\0'))
  (argv,) = [a for a in argvs if a[0].endswith('/worker_binary')]
  assert f'--max_concurrent_computation_calls={expected}' in argv


def test_worker_inherits_the_allocator_settings_of_its_owner(tmp_path, monkeypatch):
  # docs/deploy-silo.md tells operators to cap glibc's malloc arenas this way.
  monkeypatch.setenv('MALLOC_ARENA_MAX', '2')
  before = _worker_binary_pids()
  with isolated_worker.IsolatedWorker(working_dir=str(tmp_path)):
    environs = {}
    for pid in _worker_binary_pids() - before:
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        program = f.read().split(b'\0')[0]
      with open(f'/proc/{pid}/environ', 'rb') as f:
        environs[program] = f.read().split(b'\0')
  (environ,) = [e for program, e in environs.items() if program.endswith(b'/worker_binary')]
  assert b'MALLOC_ARENA_MAX=2' in environ


def test_runs_computations_reading_files_relative_to_its_working_dir(tmp_path, worker_dir):
  del worker_dir
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  from runtime import execution_context  # pylint: disable=g-import-not-at-top

  (tmp_path / 'hello.txt').write_text('from the silo')

  @tff.tensorflow.computation(np.str_)
  def read(name):
    return tf.io.read_file(name)

  with execution_context.local_worker_context(str(tmp_path)):
    assert read('hello.txt') == b'from the silo'


_REFUSE = textwrap.dedent('''
    import numpy as np
    import tensorflow_federated as tff
    from runtime import execution_context
    execution_context.refuse_unisolated_default_context()

    @tff.tensorflow.computation(np.int32)
    def add_one(x):
      return x + 1

    try:
      add_one(1)
    except execution_context.NoRuntimeError as e:
      print('refused:', e)
    else:
      print('ran without a fedpipe runtime')
''')


def test_refuses_to_run_without_a_fedpipe_runtime():
  # A fresh interpreter: the session's tff_worker fixture may hold the context here.
  before = _worker_binary_pids()
  out = subprocess.run([sys.executable, '-c', _REFUSE], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=300, stdin=subprocess.DEVNULL)
  assert 'refused:' in out.stdout, out.stdout + out.stderr
  assert 'local_worker_context' in out.stdout
  assert _worker_binary_pids() - before == set()


_OWNER = textwrap.dedent('''
    import os, sys, time
    from runtime import isolated_worker, shutdown
    with shutdown.graceful_termination():
      with isolated_worker.IsolatedWorker(working_dir=sys.argv[1]) as w:
        print(os.getpid(), w.pid, flush=True)
        time.sleep(600)
''')


def _start_owner(tmp_path):
  owner = subprocess.Popen(
      [sys.executable, '-c', _OWNER, str(tmp_path)], cwd=REPO_ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  line = owner.stdout.readline().split()
  assert len(line) == 2, 'owner did not start a worker'
  relay_pid = int(line[1])
  workers = {p for p in _worker_binary_pids()
             if os.path.exists(f'/proc/{p}/status')
             and f'PPid:\t{relay_pid}\n' in open(f'/proc/{p}/status').read()}
  assert workers, 'worker_binary is not a child of the relay'
  return owner, relay_pid, workers


@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGTERM, signal.SIGINT],
                         ids=['kill-9', 'sigterm', 'ctrl-c'])
def test_worker_ends_when_its_owner_is_killed(tmp_path, sig):
  owner, relay_pid, workers = _start_owner(tmp_path)
  os.kill(owner.pid, sig)
  owner.wait(timeout=30)
  owner.stdout.close()
  assert _wait_dead({relay_pid} | workers), f'worker survived {sig.name} of its owner'


def test_no_isolation_fails_with_the_fix_or_runs_exposed_only_when_allowed(tmp_path, monkeypatch):
  monkeypatch.setenv('PATH', '/nonexistent')  # No `unshare` to be found.
  with pytest.raises(isolated_worker.WorkerIsolationError) as error:
    isolated_worker.IsolatedWorker(working_dir=str(tmp_path)).start()
  assert 'unshare' in str(error.value)
  assert 'allow_exposed_worker' in str(error.value)
  with isolated_worker.IsolatedWorker(working_dir=str(tmp_path), allow_exposed=True) as w:
    assert w.exposed
    assert w.target.startswith('localhost:')
    pid = w.pid
  assert _wait_dead({pid})
