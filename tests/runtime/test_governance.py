"""Data-owner governance with real silo servers: approval, budgets, audit, refusals."""

import os
import re
import sqlite3
import subprocess
import sys

import grpc
import pytest

from pipelines import bundled_data
from runtime import certificates
from runtime import governance_store
from runtime import local_federation
from runtime import silo_policy
from runtime import tls as tls_lib
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

NUM_CLIENTS = 30
FITTING_PRIVACY = {
    'noise_multiplier': 1.0, 'clipping': 'fixed', 'clip_norm': 0.5, 'delta': 1e-5,
    'epsilon': None, 'accountant': 'rdp', 'sampling': 'fixed_size',
    'population_size': NUM_CLIENTS, 'clients_per_round': 10,
}


def _preprocess(raw_dir, out_dir):
  from pipelines import preprocess_pipeline  # pylint: disable=g-import-not-at-top

  preprocess_pipeline.run_on_bundled_layout(raw_dir, out_dir)


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """Beam-written data for one silo, certificates (two allowed-by-CA callers), a policy."""
  root = tmp_path_factory.mktemp('governance')
  bundled_data.write_bundled_dataset(
      source='sklearn:digits', raw_dir=str(root / 'raw'), num_clients=NUM_CLIENTS, seed=0)
  _preprocess(str(root / 'raw'), str(root / 'data'))
  certs = local_federation.make_certs(str(root / 'certs'), ['silo-a'])
  intruder = certificates.issue(certs.ca, str(root / 'certs'), common_name='intruder',
                                kind='client')
  policy = local_federation.write_policy(str(root / 'policy.toml'))
  secret = root / 'outside' / 'secret.txt'
  secret.parent.mkdir()
  secret.write_text('not for the coordinator')
  return {'root': root, 'data': str(root / 'data'), 'certs': certs, 'intruder': intruder,
          'policy': policy, 'secret': str(secret)}


class Silo:
  """A governed silo process and its state directory."""

  def __init__(self, env, state_dir, name='silo-a', governed=True):
    self.env, self.state_dir, self.name, self.governed = env, state_dir, name, governed
    self.process = None

  def start(self):
    self.process = local_federation.start_silo(
        data_dir=self.env['data'], tls=self.env['certs'].silo_tls('silo-a'),
        log_path=os.path.join(self.env['root'], f'{self.name}.log'),
        policy=self.env['policy'] if self.governed else None,
        state_dir=self.state_dir if self.governed else None)
    return self

  def stop(self):
    if self.process is not None:
      self.process.stop()
      self.process = None

  @property
  def address(self):
    return self.process.address


@pytest.fixture(scope='module')
def silo(env):
  s = Silo(env, str(env['root'] / 'state')).start()
  yield s
  s.stop()


def _tls(env, who='coordinator'):
  certs = env['certs']
  if who == 'coordinator':
    return certs.coordinator_tls()
  return tls_lib.TlsFiles(ca=certs.ca.cert, cert=env['intruder'].cert, key=env['intruder'].key)


def _channel(env, silo, who='coordinator'):
  from runtime import execution_context  # pylint: disable=g-import-not-at-top

  return grpc.secure_channel(silo.address, _tls(env, who).channel_credentials(),
                             options=execution_context.CHANNEL_OPTIONS)


def _run_on(env, silo, comp, arg, who='coordinator'):
  """Runs `comp(arg)` on the silo's worker, as a coordinator would."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  from runtime import execution_context  # pylint: disable=g-import-not-at-top

  channel = _channel(env, silo, who)
  try:
    with tff.framework.get_context_stack().install(execution_context.create_sync_context(channel)):
      return comp(arg)
  finally:
    channel.close()


def _error_text(error):
  parts = []
  while error is not None and len(parts) < 10:
    parts.append(str(error))
    if isinstance(error, grpc.RpcError) and hasattr(error, 'details'):
      parts.append(str(error.details()))
    error = error.__cause__ or error.__context__
  return '\n'.join(parts)


def _computations():
  """Client-side computations like fedpipe's: read each client's records by id."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  def count_total(extra_op):
    @tff.tensorflow.computation(np.str_)
    def count(client_id):
      records = tf.data.TFRecordDataset(tf.strings.join(['train/', client_id, '.tfrecord']))
      n = records.reduce(np.int64(0), lambda n, _: n + 1)
      return tf.identity(n) if extra_op else n

    @tff.federated_computation(tff.FederatedType(np.str_, tff.CLIENTS))
    def total(client_ids):
      return tff.federated_sum(tff.federated_map(count, client_ids))

    return total

  @tff.tensorflow.computation(np.str_)
  def read_any_file(path):
    return tf.io.read_file(path)

  return {'total': count_total(False), 'total_plus_one_op': count_total(True),
          'read_any_file': read_any_file}


def _request(name, comps, *, rounds=2, privacy=None):
  from runtime import execution_context  # pylint: disable=g-import-not-at-top
  from runtime import study_request  # pylint: disable=g-import-not-at-top

  return study_request.StudyRequest(
      name=name, rounds=rounds, model={'name': 'none', 'parameters': 0},
      privacy=dict(FITTING_PRIVACY, **(privacy or {})),
      computations=tuple(study_request.StudyComputation(
          role=role, proto=execution_context.wire_computation(c)) for role, c in comps))


def _submit(env, silo, request, who='coordinator'):
  from runtime import cross_silo  # pylint: disable=g-import-not-at-top

  conn = cross_silo.SiloConnection(cross_silo.SiloAddress(name='silo-a', address=silo.address),
                                   _tls(env, who))
  try:
    return conn.call_json('SubmitStudy', request.to_json(), timeout_s=60)
  finally:
    conn.close()


def _governance(env, silo, *args):
  return subprocess.run(
      [sys.executable, '-m', 'runtime.governance', f'--state_dir={silo.state_dir}',
       f'--policy={env["policy"]}', *args],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def _client_ids(env, n):
  from pipelines import manifest as manifest_lib  # pylint: disable=g-import-not-at-top

  return sorted(manifest_lib.read_manifest(env['data']).split('train').clients)[:n]


def _audit(silo):
  store = governance_store.GovernanceStore(silo.state_dir)
  try:
    return store.audit()
  finally:
    store.close()


# Policy files.


def test_policy_errors_name_each_field():
  with pytest.raises(silo_policy.PolicyError) as e:
    silo_policy.parse_policy('allowed_callers = []\n[privacy]\ndelta = 2\nmax_epsilon = "8"\n'
                             '[training]\nmax_rounds = 10\nbogus = 1\n', source='p.toml')
  message = str(e.value)
  for expected in ('allowed_callers must be a non-empty list', 'max_epsilon must be a float',
                   'min_noise_multiplier is missing', 'bogus is not a policy field',
                   'min_clients_per_aggregate is missing'):
    assert expected in message
  policy = silo_policy.parse_policy(local_federation.DEMO_POLICY)
  assert policy.allows_caller('coordinator') and not policy.allows_caller('intruder')


def test_silo_will_not_start_without_a_policy_or_with_a_broken_one(env, tmp_path):
  base = [sys.executable, '-m', 'runtime.silo', f'--data_dir={env["data"]}',
          '--listen=127.0.0.1:0', f'--tls_cert={env["certs"].silos["silo-a"].cert}',
          f'--tls_key={env["certs"].silos["silo-a"].key}', f'--client_ca={env["certs"].ca.cert}']
  out = subprocess.run(base, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert '--policy and --state_dir are required' in out.stderr
  assert '--allow_ungoverned' in out.stderr
  broken = tmp_path / 'broken.toml'
  broken.write_text(local_federation.DEMO_POLICY.replace('max_epsilon = 8.0', 'max_epsilon = -1'))
  out = subprocess.run(base + [f'--policy={broken}', f'--state_dir={tmp_path / "state"}'],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert 'max_epsilon must be > 0' in out.stderr and str(broken) in out.stderr


# Refusals.


def test_hostile_file_read_is_refused_but_runs_on_an_ungoverned_silo(env, silo, tmp_path):
  comps = _computations()
  with pytest.raises(Exception) as e:
    _run_on(env, silo, comps['read_any_file'], env['secret'])
  assert 'is not part of any study submitted by' in _error_text(e.value)
  refused = [a for a in _audit(silo) if a.event == 'refused']
  assert refused and refused[-1].fingerprint.startswith('sha256:')
  assert not [a for a in _audit(silo) if a.event == 'executed']
  # The control: without governance the same computation reads the file.
  open_silo = Silo(env, str(tmp_path / 'unused'), name='open', governed=False).start()
  try:
    assert _run_on(env, open_silo, comps['read_any_file'], env['secret']) == (
        b'not for the coordinator')
  finally:
    open_silo.stop()


def test_caller_with_valid_certificate_but_not_in_policy_is_refused(env, silo):
  from runtime import cross_silo  # pylint: disable=g-import-not-at-top

  conn = cross_silo.SiloConnection(cross_silo.SiloAddress(name='silo-a', address=silo.address),
                                   _tls(env, 'intruder'))
  try:
    with pytest.raises(cross_silo.SiloUnavailableError, match='intruder'):
      conn.fetch_manifest(timeout_s=30)
    with pytest.raises(cross_silo.SiloError, match="'intruder' is not allowed"):
      conn.call_json('SubmitStudy', {}, timeout_s=30)
  finally:
    conn.close()
  with pytest.raises(Exception) as e:
    _run_on(env, silo, _computations()['total'], _client_ids(env, 5), who='intruder')
  assert "caller 'intruder' is not allowed" in _error_text(e.value)


# Studies.


def test_study_over_the_epsilon_limit_cannot_be_approved(env, silo):
  request = _request('too-costly', [('train_round', _computations()['total'])], rounds=400,
                     privacy={'noise_multiplier': 0.9, 'clients_per_round': 25})
  status = _submit(env, silo, request)
  assert status['status'] == 'pending'
  assert any('exceeds max_epsilon' in v for v in status['violations'])
  shown = _governance(env, silo, 'show', request.study_id)
  assert shown.returncode == 0, shown.stderr
  assert 'does NOT fit' in shown.stdout and 'exceeds max_epsilon' in shown.stdout
  approved = _governance(env, silo, 'approve', request.study_id)
  assert approved.returncode == 2
  assert 'cannot be approved' in approved.stderr and 'max_epsilon 8' in approved.stderr
  assert _submit(env, silo, request)['status'] == 'pending'


def test_round_budget_and_one_op_change_are_enforced_across_restarts(env, tmp_path):
  silo = Silo(env, str(tmp_path / 'state'), name='budget').start()
  try:
    comps = _computations()
    ids = _client_ids(env, 5)
    request = _request('count', [('train_round', comps['total'])], rounds=2)
    assert _submit(env, silo, request)['status'] == 'pending'
    with pytest.raises(Exception) as e:  # Submitted, not yet approved.
      _run_on(env, silo, comps['total'], ids)
    assert f'study {request.study_id} is pending' in _error_text(e.value)
    shown = _governance(env, silo, 'show', request.study_id[:8])
    assert 'Policy' in shown.stdout and 'fits' in shown.stdout, shown.stderr
    assert 'TFRecordDataset' in shown.stdout
    approved = _governance(env, silo, 'approve', request.study_id)
    assert approved.returncode == 0, approved.stderr
    expected = _run_on(env, silo, comps['total'], ids)
    assert expected > 0
    assert _run_on(env, silo, comps['total'], ids) == expected
    with pytest.raises(Exception) as e:
      _run_on(env, silo, comps['total'], ids)
    assert 'has used all 2 approved rounds' in _error_text(e.value)
    with pytest.raises(Exception) as e:  # One more op: a different computation.
      _run_on(env, silo, comps['total_plus_one_op'], ids)
    assert 'is not part of any study' in _error_text(e.value)
    silo.stop()
    silo.start()
    with pytest.raises(Exception) as e:
      _run_on(env, silo, comps['total'], ids)
    assert 'has used all 2 approved rounds' in _error_text(e.value)
    with pytest.raises(Exception) as e:  # Too few clients in one aggregate.
      _run_on(env, silo, comps['total'], ids[:2])
    assert 'min_clients_per_aggregate=3' in _error_text(e.value)
  finally:
    silo.stop()
  executed = [a for a in _audit(silo) if a.event == 'executed']
  assert [a.detail['round'] for a in executed] == [1, 2]
  assert all(a.detail['clients'] == ids and a.caller == 'coordinator' for a in executed)
  assert len([a for a in _audit(silo) if a.event == 'refused']) >= 4


def test_audit_log_is_append_only_and_edits_are_detected(env, tmp_path):
  store = governance_store.GovernanceStore(str(tmp_path))
  store.record('executed', caller='coordinator', study_id='s1', detail={'clients': ['a']})
  store.record('executed', caller='coordinator', study_id='s1', detail={'clients': ['b']})
  for statement in ('UPDATE audit SET caller = "x"', 'DELETE FROM audit'):
    with pytest.raises(sqlite3.DatabaseError, match='append-only'):
      store._db.execute(statement)  # pylint: disable=protected-access
  assert len(store.audit()) == 2 and store.verify_audit() is None
  store.close()
  # Someone bypasses the triggers and edits the file directly: the chain breaks.
  db = sqlite3.connect(os.path.join(tmp_path, governance_store.DB_FILENAME))
  db.execute('DROP TRIGGER audit_no_update')
  db.execute("UPDATE audit SET detail = '{\"clients\": [\"z\"]}' WHERE seq = 1")
  db.commit()
  db.close()
  out = subprocess.run(
      [sys.executable, '-m', 'runtime.governance', f'--state_dir={tmp_path}', 'audit',
       '--verify'], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert 'TAMPERED: entry 1' in out.stderr


# The training program against a governed silo.


def test_training_run_submits_its_study_fails_early_then_trains_once_approved(env, silo,
                                                                            tmp_path):
  certs = env['certs']
  command = [
      sys.executable, '-m', 'pipelines.train', '--config=configs/digits_dp.py',
      f'--output_dir={tmp_path / "run"}', f'--silos=silo-a={silo.address}',
      f'--tls_ca={certs.ca.cert}', f'--tls_cert={certs.coordinator.cert}',
      f'--tls_key={certs.coordinator.key}', '--config.training.rounds=3',
      '--config.training.clients_per_round=10', '--config.training.sampling=fixed_size',
  ]

  def train(*extra):
    return subprocess.run(command + list(extra), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)

  first = train()
  assert first.returncode != 0
  assert 'cannot run yet' in first.stderr and 'pending approval' in first.stderr
  assert "nothing ran on any silo's data" in first.stderr
  study_id = re.search(r'study ([0-9a-f]{16})', first.stderr).group(1)
  submitted = train('--submit_study')
  assert submitted.returncode == 0, submitted.stderr
  assert f'study_id={study_id}' in submitted.stdout  # Same content, same study.
  listed = _governance(env, silo, 'list', '--status=pending')
  assert study_id in listed.stdout
  approved = _governance(env, silo, 'approve', study_id)
  assert approved.returncode == 0, approved.stderr
  done = train()
  assert done.returncode == 0, done.stderr[-3000:]
  assert f'study {study_id} approved by silo-a: 3 of 3 rounds left' in done.stdout
  assert re.search(r'test_accuracy=0\.\d+', done.stdout)
  with open(tmp_path / 'run' / 'metrics.csv') as f:
    assert len(f.read().strip().splitlines()) == 1 + 3
  entries = [a for a in _audit(silo) if a.study_id == study_id and a.event == 'executed']
  rounds = [a for a in entries if a.detail['role'] == 'train_round']
  assert [a.detail['round'] for a in rounds] == [1, 2, 3]
  assert all(len(a.detail['clients']) == 10 for a in rounds)
  assert any(a.detail['role'] == 'evaluate' for a in entries)
  audit = _governance(env, silo, 'audit', '--verify')
  assert audit.returncode == 0 and 'hash chain verified' in audit.stdout
  # The budget is spent: a fresh run of the same study is stopped before any round.
  again = train('--overwrite')
  assert again.returncode != 0
  assert '0 of 3 rounds are left and this run needs 3' in again.stderr
