"""Shared fixtures: one real, isolated TFF worker for the whole test session."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
