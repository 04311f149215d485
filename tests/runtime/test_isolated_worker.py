"""The TFF worker runs unreachable from any network and never outlives its owner."""

import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

from fedpipe.runtime import isolated_worker
from tests.conftest import (
  REPO_ROOT,
  default_sigint,
  process_alive,
  tff_worker_pids,
  wait_until,
)

pytestmark = pytest.mark.slow


def _wait_dead(pids, timeout=15.0):
  return wait_until(lambda: not any(process_alive(p) for p in pids), timeout, interval=0.1)


def _listening_tcp_ports():
  """Ports listening in the host network namespace (`ss -ltn`)."""
  out = subprocess.run(['ss', '-ltnH'], capture_output=True, text=True, check=True).stdout
  return {line.split()[3].rsplit(':', 1)[-1] for line in out.splitlines() if line.strip()}


def _descendants(pid):
  children = {}
  for entry in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{entry}/stat') as f:
        children.setdefault(int(f.read().rsplit(')', 1)[-1].split()[1]), []).append(int(entry))
    except OSError:
      pass
  found, todo = set(), [pid]
  while todo:
    for child in children.get(todo.pop(), []):
      found.add(child)
      todo.append(child)
  return found


def _host_tcp_listeners_of(pids):
  """Ports that processes `pids` listen on in the host network namespace."""
  out = subprocess.run(['ss', '-ltnpH'], capture_output=True, text=True, check=True).stdout
  return {line.split()[3] for line in out.splitlines() if any(f'pid={p},' in line for p in pids)}


def test_serves_on_a_private_unix_socket_and_no_tcp_port(tmp_path):
  before_ports = _listening_tcp_ports()
  before_workers = tff_worker_pids()
  with isolated_worker.IsolatedWorker(working_dir=str(tmp_path)) as worker:
    assert worker.target.startswith('unix://')
    path = worker.target[len('unix://') :]
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    new_workers = tff_worker_pids() - before_workers
    assert new_workers, 'no worker_binary process found'
    # The worker (listening on 8000 in its namespace) adds no host TCP port:
    # none of the processes it started listens in the host namespace.
    assert _host_tcp_listeners_of(_descendants(os.getpid())) == set()
    assert '8000' not in _listening_tcp_ports() or '8000' in before_ports
    # The worker's network namespace is not ours.
    host_ns = os.readlink('/proc/self/ns/net')
    for pid in new_workers:
      assert os.readlink(f'/proc/{pid}/ns/net') != host_ns
  assert _wait_dead(new_workers)
  assert not os.path.exists(path)


@pytest.mark.parametrize(
  'configured,expected',
  [
    (isolated_worker.TWO_PER_CORE, 2 * len(os.sched_getaffinity(0))),
    (isolated_worker.NO_LIMIT, -1),
    (-5, -1),
    (3, 3),
  ],
)
def test_worker_runs_the_configured_number_of_clients_at_once(tmp_path, configured, expected):
  assert isolated_worker.resolve_concurrent_calls(configured) == expected
  before = tff_worker_pids()
  with isolated_worker.IsolatedWorker(
    working_dir=str(tmp_path), max_concurrent_computation_calls=configured
  ):
    argvs = []
    for pid in tff_worker_pids() - before:
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        argvs.append(f.read().decode().split('\0'))
  (argv,) = [a for a in argvs if a[0].endswith('/worker_binary')]
  assert f'--max_concurrent_computation_calls={expected}' in argv


def test_worker_inherits_the_allocator_settings_of_its_owner(tmp_path, monkeypatch):
  # docs/deploy-silo.md tells operators to cap glibc's malloc arenas this way.
  monkeypatch.setenv('MALLOC_ARENA_MAX', '2')
  before = tff_worker_pids()
  with isolated_worker.IsolatedWorker(working_dir=str(tmp_path)):
    environs = {}
    for pid in tff_worker_pids() - before:
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        program = f.read().split(b'\0')[0]
      with open(f'/proc/{pid}/environ', 'rb') as f:
        environs[program] = f.read().split(b'\0')
  (environ,) = [e for program, e in environs.items() if program.endswith(b'/worker_binary')]
  assert b'MALLOC_ARENA_MAX=2' in environ


def test_runs_computations_reading_files_relative_to_its_working_dir(tmp_path, worker_dir):
  del worker_dir
  import numpy as np
  import tensorflow as tf
  import tensorflow_federated as tff

  from fedpipe.runtime import execution_context

  (tmp_path / 'hello.txt').write_text('from the silo')

  @tff.tensorflow.computation(np.str_)
  def read(name):
    return tf.io.read_file(name)

  with execution_context.local_worker_context(str(tmp_path)):
    assert read('hello.txt') == b'from the silo'


_REFUSE = textwrap.dedent("""
    import numpy as np
    import tensorflow_federated as tff
    from fedpipe.runtime import execution_context
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
""")


def test_refuses_to_run_without_a_fedpipe_runtime():
  # A fresh interpreter: the session's tff_worker fixture may hold the context here.
  before = tff_worker_pids()
  out = subprocess.run(
    [sys.executable, '-c', _REFUSE],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    stdin=subprocess.DEVNULL,
  )
  assert 'refused:' in out.stdout, out.stdout + out.stderr
  assert 'local_worker_context' in out.stdout
  assert tff_worker_pids() - before == set()


_OWNER = textwrap.dedent("""
    import os, sys, time
    from fedpipe.runtime import isolated_worker
    from fedpipe.runtime import shutdown
    with shutdown.graceful_termination():
      with isolated_worker.IsolatedWorker(working_dir=sys.argv[1]) as w:
        print(os.getpid(), w.pid, flush=True)
        time.sleep(600)
""")


def _start_owner(tmp_path):
  owner = subprocess.Popen(
    [sys.executable, '-c', _OWNER, str(tmp_path)],
    cwd=REPO_ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
    preexec_fn=default_sigint,
  )
  line = owner.stdout.readline().split()
  assert len(line) == 2, 'owner did not start a worker'
  relay_pid = int(line[1])
  workers = {
    p
    for p in tff_worker_pids()
    if os.path.exists(f'/proc/{p}/status')
    and f'PPid:\t{relay_pid}\n' in open(f'/proc/{p}/status').read()
  }
  assert workers, 'worker_binary is not a child of the relay'
  return owner, relay_pid, workers


@pytest.mark.parametrize(
  'sig', [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=['kill-9', 'sigterm', 'ctrl-c']
)
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


_FAKE_TLS_KEY = b'-----BEGIN PRIVATE KEY-----\nnot a real key\n-----END PRIVATE KEY-----\n'


def _private_data_dir(tmp_path):
  """A silo data dir as the pipeline leaves it, but private to root (0700 / 0600)."""
  data = tmp_path / 'data'
  (data / 'train').mkdir(parents=True)
  (data / 'train' / 'c0.txt').write_text('client zero')
  os.chmod(data / 'train' / 'c0.txt', 0o600)
  os.chmod(data, 0o700)
  return data


def _worker_of(relay_pid):
  (pid,) = [
    p for p in tff_worker_pids() if f'PPid:\t{relay_pid}\n' in open(f'/proc/{p}/status').read()
  ]
  return pid


def _status(pid):
  with open(f'/proc/{pid}/status') as f:
    return dict(line.rstrip('\n').split(':\t', 1) for line in f if ':\t' in line)


def _file_reader():
  """A computation that returns the contents of the file at a path it is given."""
  import numpy as np
  import tensorflow as tf
  import tensorflow_federated as tff

  @tff.tensorflow.computation(np.str_)
  def read(path):
    return tf.io.read_file(path)

  return read


def test_computations_read_only_files_in_the_working_dir(tmp_path):
  from fedpipe.runtime import execution_context

  data = _private_data_dir(tmp_path)
  key = tmp_path / 'silo.key'
  key.write_bytes(_FAKE_TLS_KEY)
  os.chmod(key, 0o600)

  read = _file_reader()

  with execution_context.local_worker_context(str(data)) as worker:
    assert worker.confined
    assert read('train/c0.txt') == b'client zero'
    for path in (
      str(key),
      '/etc/shadow',
      '/etc/passwd',
      os.path.join(str(data), 'train/c0.txt'),
      f'{REPO_ROOT}/fedpipe/cli/silo.py',
      '/root/.bashrc',
    ):
      with pytest.raises(
        Exception, match='No such file or directory|NOT_FOUND|Permission denied'
      ) as error:
        read(path)
      assert b'PRIVATE KEY' not in str(error.value).encode()


def test_computations_cannot_write_into_the_working_dir(tmp_path):
  import numpy as np
  import tensorflow as tf
  import tensorflow_federated as tff

  from fedpipe.runtime import execution_context

  data = _private_data_dir(tmp_path)

  @tff.tensorflow.computation(np.str_)
  def write_and_read(path):
    with tf.control_dependencies([tf.io.write_file(path, 'written')]):
      return tf.io.read_file(path)

  with execution_context.local_worker_context(str(data)):
    for path in ('train/c0.txt', 'new.txt', '/data/new.txt'):
      with pytest.raises(Exception, match='Read-only file system|Permission denied'):
        write_and_read(path)
    # The private scratch tmpfs takes writes, the host's path among them.
    assert write_and_read('/tmp/scratch.txt') == b'written'
    assert write_and_read(f'{data}/new.txt') == b'written'
  assert sorted(os.listdir(data)) == ['train']
  assert (data / 'train' / 'c0.txt').read_text() == 'client zero'
  assert not os.path.exists('/tmp/scratch.txt')


def test_worker_runs_unprivileged_in_its_own_mount_and_pid_namespaces(tmp_path):
  data = _private_data_dir(tmp_path)
  with isolated_worker.IsolatedWorker(working_dir=str(data)) as worker:
    pid = _worker_of(worker.pid)
    status = _status(pid)
    if os.geteuid() == 0:
      assert set(status['Uid'].split()) == {'65534'}
      assert set(status['Gid'].split()) == {'65534'}
      assert status['Groups'].strip() == ''
    for caps in ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb'):
      assert int(status[caps], 16) == 0, caps
    assert status['NoNewPrivs'] == '1'
    assert status['NSpid'].split()[-1] == '1'  # The init of its own PID namespace.
    for ns in ('mnt', 'pid', 'net'):
      assert os.readlink(f'/proc/{pid}/ns/{ns}') != os.readlink(f'/proc/self/ns/{ns}'), ns
    # Its root holds only what it needs; its working dir is the data, read-only.
    assert set(os.listdir(f'/proc/{pid}/root')) <= {
      'bin',
      'data',
      'dev',
      'lib',
      'lib32',
      'lib64',
      'libx32',
      'opt',
      'proc',
      'sbin',
      'tmp',
      'usr',
      isolated_worker.worker_binary_path().split('/')[1],
    }
    assert not os.path.exists(f'/proc/{pid}/root/etc')
    assert os.readlink(f'/proc/{pid}/cwd') == '/data'
    with open(f'/proc/{pid}/mountinfo') as f:
      (data_mount,) = [line.split() for line in f if line.split()[4] == '/data']
    assert 'ro' in data_mount[5].split(',')


@pytest.mark.skipif(os.geteuid() != 0, reason='only root maps the data owner to 65534')
def test_no_confinement_fails_with_the_fix_or_runs_unconfined_only_when_allowed():
  # devpts supports no ID-mapped mounts, so root cannot show its files to uid 65534.
  with pytest.raises(isolated_worker.WorkerConfinementError) as error:
    isolated_worker.IsolatedWorker(working_dir='/dev/pts').start()
  assert 'allow_unconfined_worker' in str(error.value)
  with isolated_worker.IsolatedWorker(
    working_dir='/dev/pts', allow_unconfined_filesystem=True
  ) as worker:
    assert not worker.confined and not worker.exposed
    assert worker.target.startswith('unix://')
    pid = _worker_of(worker.pid)
    assert os.readlink(f'/proc/{pid}/ns/mnt') == os.readlink('/proc/self/ns/mnt')
    assert os.readlink(f'/proc/{pid}/ns/net') != os.readlink('/proc/self/ns/net')


_KILLED_OWNER = textwrap.dedent("""
    import sys, time
    from fedpipe.runtime import isolated_worker
    worker = isolated_worker.IsolatedWorker(working_dir=sys.argv[1])
    worker.start()
    print(worker.target, flush=True)
    time.sleep(600)
""")


def test_temporary_dirs_go_on_stop_and_after_kill_9_at_the_next_start(tmp_path, private_tmpdir):
  owner = subprocess.Popen(
    [sys.executable, '-c', _KILLED_OWNER, str(tmp_path)],
    cwd=REPO_ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  with owner:
    target = owner.stdout.readline().strip()
    assert target.startswith(f'unix://{private_tmpdir}/fedpipe-worker-{owner.pid}-')
    owner_dir = os.path.dirname(target[len('unix://') :])
    with isolated_worker.IsolatedWorker(working_dir=str(tmp_path)) as worker:
      # A live owner's directory stays.
      assert sorted(os.listdir(private_tmpdir)) == sorted(
        [os.path.basename(owner_dir), os.path.basename(os.path.dirname(worker.log_path))]
      )
    assert os.listdir(private_tmpdir) == [os.path.basename(owner_dir)]
    owner.kill()
  assert os.path.isdir(owner_dir)  # SIGKILL left it.
  with isolated_worker.IsolatedWorker(working_dir=str(tmp_path)):
    assert not os.path.exists(owner_dir)
  assert os.listdir(private_tmpdir) == []


@pytest.mark.slow
def test_a_checkout_under_tmp_runs_its_worker_confined(tmp_path, monkeypatch):
  """The worker binary of a checkout under /tmp (a CI clone, say) would land in
  the sandbox's own /tmp: it is mounted elsewhere inside."""
  from fedpipe.runtime import execution_context

  assert str(tmp_path).startswith('/tmp/')
  binary = tmp_path / 'venv' / 'tensorflow_federated' / 'data' / 'worker_binary'
  binary.parent.mkdir(parents=True)
  shutil.copy2(isolated_worker.worker_binary_path(), binary)
  monkeypatch.setattr(isolated_worker, 'worker_binary_path', lambda: str(binary))
  data = _private_data_dir(tmp_path)

  read = _file_reader()

  with execution_context.local_worker_context(str(data)) as worker:
    assert worker.confined
    assert read('train/c0.txt') == b'client zero'
