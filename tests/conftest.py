"""Shared fixtures and helpers.

One real, isolated TFF worker for the whole test session; digits client data
preprocessed once by the real Beam pipeline; a certificate from another CA;
helpers for processes, waits and silo logs.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# The environment a user's shell gives the programs the tests start. Importing
# a library can add to this process's environment, and every child would then
# inherit it: TensorFlow sets TF2_BEHAVIOR=1, which hid a fedpipe-train that
# failed outside the tests (TensorFlow imported inside absl's `main`).
_SHELL_ENVIRONMENT = frozenset(os.environ)

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The shared digits data: how many clients the session's `digits_client_data` holds.
DIGITS_NUM_CLIENTS = 30


def default_sigint() -> None:
  """`preexec_fn` for a child that must take Ctrl-C as from a terminal.

  A suite started as a background job of a non-interactive shell inherits an
  ignored SIGINT, and Python keeps it ignored in its children.
  """
  import signal

  signal.signal(signal.SIGINT, signal.SIG_DFL)


def tamper_governance_db(state_dir, *statements):
  """Edits a silo's governance database as an intruder would: triggers dropped, SQL run."""
  import sqlite3

  from fedpipe.governance import store as governance_store

  db = sqlite3.connect(os.path.join(state_dir, governance_store.DB_FILENAME))
  db.execute('DROP TRIGGER IF EXISTS audit_no_update')
  db.execute('DROP TRIGGER IF EXISTS audit_no_delete')
  for statement in statements:
    db.execute(statement)
  db.commit()
  db.close()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
  """A test that uses the session's TFF worker starts one: `slow`, as the marker is defined.

  First, so that `-m "not slow"` deselects it.
  """
  for item in items:
    if 'tff_worker' in getattr(item, 'fixturenames', ()):
      item.add_marker(pytest.mark.slow)
  _heaviest_files_first(items)


def _heaviest_files_first(items):
  """Orders test files by how many `slow` tests they hold, most first; tests keep their order.

  `make test` hands whole files to its processes (`--dist loadfile
  --no-loadscope-reorder`) in this order: the long files start at once and
  the short ones fill in around them, so no process is left with a long file
  at the end while the other waits.
  """
  slow = {}
  for item in items:
    slow.setdefault(item.path, 0)
    if item.get_closest_marker('slow'):
      slow[item.path] += 1
  first_seen = {path: i for i, path in enumerate(slow)}
  items.sort(key=lambda item: (-slow[item.path], first_seen[item.path]))


@pytest.fixture(autouse=True)
def _shell_environment():
  """Drops what imports added to the environment, so programs start as from a shell.

  Before each test, ahead of its fixtures: a test's own `monkeypatch.setenv`
  stays. pytest's own variables stay too.
  """
  for key in set(os.environ) - _SHELL_ENVIRONMENT:
    if not key.startswith('PYTEST_'):
      del os.environ[key]


def wait_until(predicate, timeout=20.0, interval=0.2):
  """Polls `predicate` until it is true (True) or `timeout` seconds pass (False)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(interval)
  return False


def process_alive(pid):
  """Whether process `pid` exists and is not a zombie."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[-1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


# Under pytest-xdist each test process sees only the workers its own tests
# started: they (and any orphan they leave) inherit its PYTEST_XDIST_WORKER.
_XDIST_WORKER = os.environ.get('PYTEST_XDIST_WORKER')


def _started_by_this_test_process(pid):
  if _XDIST_WORKER is None:
    return True
  try:
    with open(f'/proc/{pid}/environ', 'rb') as f:
      environ = f.read().split(b'\0')
  except OSError:
    return False
  return f'PYTEST_XDIST_WORKER={_XDIST_WORKER}'.encode() in environ


def tff_worker_pids():
  """The pids of every running TFF `worker_binary` that this test process started."""
  out = subprocess.run(
    ['pgrep', '-f', 'tensorflow_federated/data/worker_binary'], capture_output=True, text=True
  ).stdout
  return {int(p) for p in out.split() if _started_by_this_test_process(int(p))}


def log_events(log_path, event=None):
  """The JSON entries of a silo's log (those with `event`, if given), in order."""
  with open(log_path) as f:
    entries = [json.loads(line) for line in f if line.startswith('{')]
  return [e for e in entries if event is None or e.get('event') == event]


@dataclasses.dataclass(frozen=True)
class DigitsClientData:
  """Bundled digits raw data and its preprocessing (the pipeline's output directory)."""

  raw_dir: str
  train_file: str
  test_file: str
  feature_spec_file: str
  processed: str
  num_clients: int = DIGITS_NUM_CLIENTS


@pytest.fixture(scope='session')
def digits_client_data(tmp_path_factory):
  """Digits over 30 IID clients (seed 0), preprocessed once by the real Beam pipeline.

  Shared by the session: read it, never write into it (copy it first).
  """
  from fedpipe.datasets import bundled_data
  from fedpipe.pipelines import pipeline as preprocess_pipeline

  root = tmp_path_factory.mktemp('digits')
  raw = bundled_data.write_bundled_dataset(
    source='sklearn:digits', raw_dir=str(root / 'raw'), num_clients=DIGITS_NUM_CLIENTS, seed=0
  )
  processed = str(root / 'clients')
  preprocess_pipeline.run_on_bundled_layout(raw.raw_dir, processed)
  return DigitsClientData(
    raw_dir=raw.raw_dir,
    train_file=raw.train_file,
    test_file=raw.test_file,
    feature_spec_file=raw.feature_spec_file,
    processed=processed,
  )


@pytest.fixture(scope='session')
def rogue_coordinator(tmp_path_factory):
  """A client certificate named 'coordinator', signed by a CA no silo trusts."""
  from fedpipe.federation import certificates

  root = str(tmp_path_factory.mktemp('rogue'))
  rogue_ca = certificates.create_ca(root, name='rogue CA')
  return certificates.issue(rogue_ca, root, common_name='coordinator', kind='client')


@pytest.fixture
def private_tmpdir(monkeypatch):
  """A short TMPDIR of this test's own (unix socket paths are limited to 107 bytes)."""
  path = tempfile.mkdtemp(prefix='fp-', dir='/tmp')
  monkeypatch.setenv('TMPDIR', path)
  monkeypatch.setattr(tempfile, 'tempdir', path)
  yield path
  shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope='session')
def worker_dir(tmp_path_factory):
  """The working directory of the session's TFF worker (client data goes here)."""
  return str(tmp_path_factory.mktemp('worker'))


@pytest.fixture(scope='session')
def tff_worker(worker_dir):
  """A running isolated worker installed as TFF's default context."""
  from fedpipe.runtime import execution_context

  with execution_context.local_worker_context(
    worker_dir, log_path=os.path.join(worker_dir, 'worker.log')
  ) as worker:
    yield worker


@pytest.fixture(scope='session', autouse=True)
def _no_unisolated_tff_worker():
  """TFF's import-time default context would start an exposed worker: refuse it."""
  from fedpipe.runtime import execution_context

  execution_context.refuse_unisolated_default_context()
