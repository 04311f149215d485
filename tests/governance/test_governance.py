"""Data-owner governance with real silo servers: approval, budgets, audit, refusals."""

import json
import os
import pathlib
import re
import subprocess
import sys

import grpc
import pytest

from fedpipe.federation import certificates, local_federation
from fedpipe.federation import tls as tls_lib
from fedpipe.governance import policy as silo_policy
from fedpipe.governance import store as governance_store
from tests.conftest import DIGITS_NUM_CLIENTS, REPO_ROOT, tamper_governance_db

pytestmark = pytest.mark.slow

NUM_CLIENTS = DIGITS_NUM_CLIENTS
FITTING_PRIVACY = {
  'noise_multiplier': 1.0,
  'clipping': 'fixed',
  'clip_norm': 0.5,
  'delta': 1e-5,
  'epsilon': None,
  'accountant': 'rdp',
  'sampling': 'fixed_size',
  'population_size': NUM_CLIENTS,
  'clients_per_round': 10,
}


@pytest.fixture(scope='module')
def federation(tmp_path_factory, digits_client_data):
  """One governed silo, `silo-a`, on the session's Beam-written digits data."""
  root = tmp_path_factory.mktemp('governance')
  with local_federation.start_local_federation(
    {'silo-a': digits_client_data.processed}, str(root)
  ) as running:
    yield running


@pytest.fixture(scope='module')
def env(federation, digits_client_data):
  """The silo's data, the federation's certificates (two allowed-by-CA callers), its policy."""
  root = pathlib.Path(federation.work_dir)
  certs = federation.certs
  intruder = certificates.issue(
    certs.ca, str(root / 'certs'), common_name='intruder', kind='client'
  )
  secret = root / 'outside' / 'secret.txt'
  secret.parent.mkdir()
  secret.write_text('not for the coordinator')
  return {
    'root': root,
    'data': digits_client_data.processed,
    'certs': certs,
    'intruder': intruder,
    'policy': federation.policy_path('silo-a'),
    'secret': str(secret),
  }


class Silo:
  """A governed silo process and its state directory."""

  def __init__(self, env, state_dir, name='silo-a', governed=True):
    self.env, self.state_dir, self.name, self.governed = env, state_dir, name, governed
    self.process = None

  def start(self):
    self.process = local_federation.start_silo(
      data_dir=self.env['data'],
      tls=self.env['certs'].silo_tls('silo-a'),
      log_path=os.path.join(self.env['root'], f'{self.name}.log'),
      policy=self.env['policy'] if self.governed else None,
      state_dir=self.state_dir if self.governed else None,
    )
    return self

  def stop(self):
    if self.process is not None:
      self.process.stop()
      self.process = None

  @property
  def address(self):
    return self.process.address


@pytest.fixture(scope='module')
def silo(env, federation):
  """The federation's silo (the federation stops it)."""
  s = Silo(env, federation.state_dir('silo-a'))
  s.process = federation.silos['silo-a']
  return s


def _tls(env, who='coordinator'):
  certs = env['certs']
  if who == 'coordinator':
    return certs.coordinator_tls()
  return tls_lib.TlsFiles(ca=certs.ca.cert, cert=env['intruder'].cert, key=env['intruder'].key)


def _channel(env, silo, who='coordinator'):
  from fedpipe.runtime import execution_context

  return grpc.secure_channel(
    silo.address, _tls(env, who).channel_credentials(), options=execution_context.CHANNEL_OPTIONS
  )


def _run_on(env, silo, comp, arg, who='coordinator'):
  """Runs `comp(arg)` on the silo's worker, as a coordinator would."""
  import tensorflow_federated as tff

  from fedpipe.runtime import execution_context

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


def _client_records(client_id):
  """A training client's records in the silo's clients.sqlite, read as fedpipe reads them."""
  import tensorflow as tf

  from fedpipe.computations import client_data
  from fedpipe.data import client_store

  before, after = client_store.client_query('train')
  return client_data.read_store_records(tf.strings.join([before, client_id, after]))


def _computations():
  """Client-side computations like fedpipe's: read each client's records by id."""
  import numpy as np
  import tensorflow as tf
  import tensorflow_federated as tff

  def count_total(extra_op):
    @tff.tensorflow.computation(np.str_)
    def count(client_id):
      records = _client_records(client_id)
      n = records.reduce(np.int64(0), lambda n, _: n + 1)
      return tf.identity(n) if extra_op else n

    @tff.federated_computation(tff.FederatedType(np.str_, tff.CLIENTS))
    def total(client_ids):
      return tff.federated_sum(tff.federated_map(count, client_ids))

    return total

  @tff.tensorflow.computation(np.str_)
  def read_any_file(path):
    return tf.io.read_file(path)

  @tff.tensorflow.computation(np.str_)
  def spread(client_id):  # 100 numbers per client: model-sized, not metrics.
    records = _client_records(client_id)
    return tf.fill([100], tf.cast(records.reduce(np.int64(0), lambda n, _: n + 1), tf.float32))

  @tff.federated_computation(tff.FederatedType(np.str_, tff.CLIENTS))
  def model_sized(client_ids):
    return tff.federated_sum(tff.federated_map(spread, client_ids))

  @tff.tensorflow.computation(np.str_)
  def fail_on_data(client_id):  # Fails, or not, depending on the data: one bit a call.
    records = _client_records(client_id)
    n = records.reduce(np.int64(0), lambda n, _: n + 1)
    with tf.control_dependencies([tf.debugging.Assert(n < 0, [n])]):
      return tf.identity(n)

  @tff.federated_computation(tff.FederatedType(np.str_, tff.CLIENTS))
  def failing(client_ids):
    return tff.federated_sum(tff.federated_map(fail_on_data, client_ids))

  return {
    'total': count_total(False),
    'total_plus_one_op': count_total(True),
    'read_any_file': read_any_file,
    'model_sized': model_sized,
    'failing': failing,
  }


def _request(name, comps, *, rounds=2, privacy=None, evaluations=0):
  from fedpipe.governance import study_request
  from fedpipe.runtime import execution_context

  return study_request.StudyRequest(
    name=name,
    rounds=rounds,
    evaluations=evaluations,
    model={'name': 'none', 'parameters': 0},
    privacy=dict(FITTING_PRIVACY, **(privacy or {})),
    computations=tuple(
      study_request.StudyComputation(role=role, proto=execution_context.wire_computation(c))
      for role, c in comps
    ),
  )


def _on_silo(env, silo, ask, who='coordinator'):
  """`ask(connection)` on a coordinator's connection to the silo."""
  from fedpipe.federation import cross_silo

  conn = cross_silo.SiloConnection(
    cross_silo.SiloAddress(name='silo-a', address=silo.address), _tls(env, who)
  )
  try:
    return ask(conn)
  finally:
    conn.close()


def _submit(env, silo, request, who='coordinator'):
  return _on_silo(env, silo, lambda conn: conn.submit_study(request, timeout_s=60), who)


def _governance(env, silo, *args):
  return subprocess.run(
    [
      sys.executable,
      '-m',
      'fedpipe.cli.governance',
      f'--state_dir={silo.state_dir}',
      f'--policy={env["policy"]}',
      *args,
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    stdin=subprocess.DEVNULL,
  )


def _client_ids(env, n):
  from fedpipe.data import manifest as manifest_lib

  return sorted(manifest_lib.read_manifest(env['data']).split('train').clients)[:n]


def _audit(silo):
  store = governance_store.GovernanceStore(silo.state_dir)
  try:
    return store.audit()
  finally:
    store.close()


# Policy files.


def test_silo_will_not_start_without_a_policy_or_with_a_broken_one(env, tmp_path):
  base = [
    sys.executable,
    '-m',
    'fedpipe.cli.silo',
    f'--data_dir={env["data"]}',
    '--listen=127.0.0.1:0',
    f'--tls_cert={env["certs"].silos["silo-a"].cert}',
    f'--tls_key={env["certs"].silos["silo-a"].key}',
    f'--client_ca={env["certs"].ca.cert}',
  ]
  out = subprocess.run(base, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert '--policy and --state_dir are required' in out.stderr
  assert '--allow_ungoverned' in out.stderr
  broken = tmp_path / 'broken.toml'
  broken.write_text(local_federation.DEMO_POLICY.replace('max_epsilon = 8.0', 'max_epsilon = -1'))
  out = subprocess.run(
    base + [f'--policy={broken}', f'--state_dir={tmp_path / "state"}'],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
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
  # The control: without governance the computation runs, and only the
  # worker's filesystem sandbox (it sees the client data alone) stops the read.
  open_silo = Silo(env, str(tmp_path / 'unused'), name='open', governed=False).start()
  try:
    with pytest.raises(Exception) as e:
      _run_on(env, open_silo, comps['read_any_file'], env['secret'])
    assert 'No such file or directory' in _error_text(e.value)
    assert 'is not part of any study' not in _error_text(e.value)
  finally:
    open_silo.stop()


def test_caller_with_valid_certificate_but_not_in_policy_is_refused(env, silo):
  from fedpipe.federation import cross_silo

  conn = cross_silo.SiloConnection(
    cross_silo.SiloAddress(name='silo-a', address=silo.address), _tls(env, 'intruder')
  )
  try:
    with pytest.raises(cross_silo.SiloUnavailableError, match='intruder'):
      conn.fetch_manifest(timeout_s=30)
    with pytest.raises(cross_silo.SiloError, match="'intruder' is not allowed"):
      conn.study_status('0123456789abcdef', timeout_s=30)
  finally:
    conn.close()
  with pytest.raises(Exception) as e:
    _run_on(env, silo, _computations()['total'], _client_ids(env, 5), who='intruder')
  assert "caller 'intruder' is not allowed" in _error_text(e.value)


# Studies.


def test_study_over_the_epsilon_limit_cannot_be_approved(env, silo):
  request = _request(
    'too-costly',
    [('train_round', _computations()['total'])],
    rounds=400,
    privacy={'noise_multiplier': 0.9, 'clients_per_round': 25},
  )
  status = _submit(env, silo, request)
  assert status.status == 'pending'
  assert any('exceeds max_epsilon' in v for v in status.violations)
  shown = _governance(env, silo, 'show', request.study_id)
  assert shown.returncode == 0, shown.stderr
  assert 'does NOT fit' in shown.stdout and 'exceeds max_epsilon' in shown.stdout
  approved = _governance(env, silo, 'approve', request.study_id)
  assert approved.returncode == 2
  assert 'cannot be approved' in approved.stderr and 'max_epsilon 8' in approved.stderr
  assert _submit(env, silo, request).status == 'pending'
  assert _on_silo(env, silo, lambda conn: conn.study_status(request.study_id, 60)) == status


def test_round_budget_and_one_op_change_are_enforced_across_restarts(env, tmp_path):
  silo = Silo(env, str(tmp_path / 'state'), name='budget').start()
  try:
    comps = _computations()
    ids = _client_ids(env, 5)
    request = _request('count', [('train_round', comps['total'])], rounds=2)
    assert _submit(env, silo, request).status == 'pending'
    with pytest.raises(Exception) as e:  # Submitted, not yet approved.
      _run_on(env, silo, comps['total'], ids)
    assert f'study {request.study_id} is pending' in _error_text(e.value)
    shown = _governance(env, silo, 'show', request.study_id[:8])
    assert 'Policy' in shown.stdout and 'fits' in shown.stdout, shown.stderr
    assert 'SqlDataset' in shown.stdout
    approved = _governance(env, silo, 'approve', request.study_id)
    assert approved.returncode == 0, approved.stderr
    expected = _run_on(env, silo, comps['total'], ids)
    assert expected > 0
    assert _run_on(env, silo, comps['total'], ids) == expected
    with pytest.raises(Exception) as e:
      _run_on(env, silo, comps['total'], ids)
    assert 'has used all 2 approved rounds' in _error_text(e.value)
    assert f'fedpipe-governance extend {request.study_id} --rounds=N' in _error_text(e.value)
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
    with pytest.raises(Exception) as e:  # One client three times is one client.
      _run_on(env, silo, comps['total'], [ids[0]] * 3)
    assert 'client ids repeat within one aggregate' in _error_text(e.value)
  finally:
    silo.stop()
  executed = [a for a in _audit(silo) if a.event == 'executed']
  assert [a.detail['call'] for a in executed] == [1, 2]
  assert all(a.detail['clients'] == ids and a.caller == 'coordinator' for a in executed)
  # The privacy cost, recomputed at the silo from the approved parameters.
  assert 0 < executed[0].detail['epsilon'] < executed[1].detail['epsilon']
  assert executed[1].detail['lifetime_epsilon'] == pytest.approx(executed[1].detail['epsilon'])
  assert len([a for a in _audit(silo) if a.event == 'refused']) >= 4


def test_governance_audit_verify_names_an_edited_entry(tmp_path):
  """The program's view of a direct edit (tests/governance/test_store.py: the store's)."""
  store = governance_store.GovernanceStore(str(tmp_path))
  store.record('executed', caller='coordinator', study_id='s1', detail={'clients': ['a']})
  store.record('executed', caller='coordinator', study_id='s1', detail={'clients': ['b']})
  store.close()
  tamper_governance_db(
    str(tmp_path), 'UPDATE audit SET detail = \'{"clients": ["z"]}\' WHERE seq = 1'
  )
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'fedpipe.cli.governance',
      f'--state_dir={tmp_path}',
      'audit',
      '--verify',
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 1
  assert 'TAMPERED' in out.stderr and 'entry 1: its content does not match' in out.stderr


# The training program against a governed silo.


def test_training_run_submits_its_study_fails_early_then_trains_once_approved(env, silo, tmp_path):
  certs = env['certs']
  command = [
    sys.executable,
    '-m',
    'fedpipe.cli.train',
    '--config=configs/digits_dp.py',
    f'--output_dir={tmp_path / "run"}',
    f'--silos=silo-a={silo.address}',
    f'--tls_ca={certs.ca.cert}',
    f'--tls_cert={certs.coordinator.cert}',
    f'--tls_key={certs.coordinator.key}',
    '--config.training.rounds=3',
    '--config.training.clients_per_round=10',
    '--config.training.sampling=fixed_size',
    '--config.dp.accountant=rdp',
  ]

  def train(*extra):
    return subprocess.run(
      command + list(extra),
      cwd=REPO_ROOT,
      capture_output=True,
      text=True,
      timeout=600,
      stdin=subprocess.DEVNULL,
    )

  first = train()
  assert first.returncode != 0
  assert 'cannot run yet' in first.stderr and 'pending approval' in first.stderr
  assert "Nothing more ran on any silo's data" in first.stderr
  study_id = re.search(r'study ([0-9a-f]{16})', first.stderr).group(1)
  listed = _governance(env, silo, 'list', '--status=pending')
  assert study_id in listed.stdout
  approved = _governance(env, silo, 'approve', study_id)
  assert approved.returncode == 0, approved.stderr
  done = train()
  assert done.returncode == 0, done.stderr[-3000:]
  assert f'study {study_id} approved by silo-a: 3 of 3 rounds and 1 of 1 evaluations left' in (
    done.stdout
  )
  assert re.search(r'test_accuracy=0\.\d+', done.stdout)
  assert 'engine: cohort' in done.stdout  # The silo approved and ran the cohort engine's.
  with open(tmp_path / 'run' / 'metrics.csv') as f:
    assert len(f.read().strip().splitlines()) == 1 + 3
  entries = [a for a in _audit(silo) if a.study_id == study_id and a.event == 'executed']
  rounds = [a for a in entries if a.detail['role'] == 'train_round']
  assert [a.detail['call'] for a in rounds] == [1, 2, 3]
  assert all(len(a.detail['clients']) == 10 for a in rounds)
  assert any(a.detail['role'] == 'evaluate' for a in entries)
  audit = _governance(env, silo, 'audit', '--verify')
  assert audit.returncode == 0 and 'hash chain and anchor verified' in audit.stdout
  # The budget is spent: a fresh run of the same study is stopped before any
  # round, told exactly what to ask for; once extended, the same command runs.
  again = train('--overwrite')
  assert again.returncode == 2
  assert '0 of 3 rounds, 0 of 1 evaluations are left and this run needs 3 rounds' in again.stderr
  ask = f'fedpipe-governance extend {study_id} --rounds=3 --evaluations=1'
  assert ask in again.stderr
  declined = subprocess.run(
    [
      sys.executable,
      '-m',
      'fedpipe.cli.governance',
      f'--state_dir={silo.state_dir}',
      f'--policy={env["policy"]}',
      'extend',
      study_id,
      '--rounds=3',
      '--evaluations=1',
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    input='n\n',
  )
  assert declined.returncode == 1 and 'not extended' in declined.stdout
  extended = subprocess.run(
    [
      sys.executable,
      '-m',
      'fedpipe.cli.governance',
      f'--state_dir={silo.state_dir}',
      f'--policy={env["policy"]}',
      'extend',
      study_id,
      '--rounds=3',
      '--evaluations=1',
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    input='y\n',
  )
  assert extended.returncode == 0, extended.stderr
  eps = re.search(r'epsilon at delta 1e-05: ([0-9.]+) -> ([0-9.]+)', extended.stdout)
  assert eps and float(eps.group(2)) > float(eps.group(1)) > 0, extended.stdout
  assert 'extend? [y/N]' in extended.stdout and 'to 6 rounds and 2 evaluations' in extended.stdout
  resumed = train('--overwrite')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'study {study_id} approved by silo-a: 3 of 6 rounds' in resumed.stdout


# A dishonest coordinator: labels, file readers, results that never left.


def _governed_silo(env, tmp_path, name):
  return Silo(env, str(tmp_path / 'state'), name=name).start()


def _approve(env, silo, study_id, *extra):
  out = _governance(env, silo, 'approve', study_id, *extra)
  assert out.returncode == 0, out.stderr
  return out


def test_calls_are_charged_by_what_runs_not_by_their_label(env, tmp_path):
  """Finding: a computation labelled `evaluate` ran without limit."""
  silo = _governed_silo(env, tmp_path, 'labels')
  try:
    comps = _computations()
    ids = _client_ids(env, 5)
    labelled = _request('labelled', [('evaluate', comps['total'])], rounds=1, evaluations=2)
    assert _submit(env, silo, labelled).violations == ()
    _approve(env, silo, labelled.study_id)
    assert _run_on(env, silo, comps['total'], ids) == _run_on(env, silo, comps['total'], ids)
    with pytest.raises(Exception) as e:
      _run_on(env, silo, comps['total'], ids)
    assert 'has used all 2 approved evaluations' in _error_text(e.value)
    listed = _governance(env, silo, 'list')
    assert re.search(rf'{labelled.study_id} +approved +0/1 +2/2', listed.stdout), listed.stdout
    # The same computation under another label in a second study: refused.
    relabelled = _request('relabelled', [('train_round', comps['total'])], rounds=3)
    status = _submit(env, silo, relabelled)
    assert any(
      f'was submitted as evaluate in study {labelled.study_id}' in v for v in status.violations
    ), status
    assert _governance(env, silo, 'approve', relabelled.study_id).returncode == 2
    # A model-sized release cannot pass as an evaluation.
    disguised = _request('disguised', [('evaluate', comps['model_sized'])], evaluations=1)
    status = _submit(env, silo, disguised)
    assert any(
      'releases 100 numbers per call; an evaluation releases metrics only' in v
      for v in status.violations
    ), status
    # Without `allow_unnoised_metrics` no evaluation fits at all.
    strict = env['root'] / 'strict.toml'
    strict.write_text(local_federation.DEMO_POLICY.split('[evaluation]')[0])
    out = subprocess.run(
      [
        sys.executable,
        '-m',
        'fedpipe.cli.governance',
        f'--state_dir={silo.state_dir}',
        f'--policy={strict}',
        'show',
        labelled.study_id,
      ],
      cwd=REPO_ROOT,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert 'allow_unnoised_metrics = false' in out.stdout, out.stdout + out.stderr
  finally:
    silo.stop()


def test_a_file_reader_does_not_fit_and_cannot_be_approved(env, silo):
  """Finding: `show` said "fits" to a study whose computation read any file."""
  reader = _request('reader', [('evaluate', _computations()['read_any_file'])], evaluations=2)
  status = _submit(env, silo, reader)
  assert status.status == 'pending'
  shown = _governance(env, silo, 'show', reader.study_id)
  assert 'does NOT fit' in shown.stdout, shown.stdout
  short = reader.computations[0].fingerprint.split(':')[1][:12]
  for expected in (
    f'evaluate computation {short}: op ReadFile reads files other than through '
    'the client-data reader',
    f'evaluate computation {short}: it takes no client ids',
    f'evaluate computation {short}: what leaves the silo includes strings',
  ):
    assert expected in shown.stdout, shown.stdout
  approved = _governance(env, silo, 'approve', reader.study_id)
  assert approved.returncode == 2 and 'op ReadFile' in approved.stderr
  with pytest.raises(Exception) as e:
    _run_on(env, silo, _computations()['read_any_file'], '/etc/passwd')
  assert f'study {reader.study_id} is pending' in _error_text(e.value)


def _remote_executor(env, silo, n_clients):
  import tensorflow_federated as tff

  from fedpipe.runtime import execution_context

  channel = _channel(env, silo)
  executor = tff.framework.RemoteExecutor(execution_context.FailFastStub(channel))
  executor.set_cardinalities({tff.CLIENTS: n_clients})
  return channel, executor


def test_a_result_is_charged_when_it_leaves_the_silo_and_not_before(env, tmp_path):
  """A hostile client drives TFF's executor protocol by hand: calls whose result
  it never fetches are not charged (the round failed before any release); the
  first fetch is charged once, before the result leaves."""
  import asyncio

  import numpy as np
  import tensorflow_federated as tff

  silo = _governed_silo(env, tmp_path, 'release')
  try:
    comp = _computations()['total']
    ids = _client_ids(env, 5)
    request = _request('release', [('train_round', comp)], rounds=2)
    _submit(env, silo, request)
    _approve(env, silo, request.study_id)
    native = tff.backends.native.desugar_and_transform_to_native(comp)
    ids_type = tff.FederatedType(np.str_, tff.CLIENTS)

    async def call(fetch):
      channel, executor = _remote_executor(env, silo, len(ids))
      try:
        fn = await executor.create_value(native, native.type_signature)
        arg = await executor.create_value(ids, ids_type)
        result = await executor.create_call(fn, arg)
        return await result.compute() if fetch else None
      finally:
        executor.close()
        channel.close()

    for _ in range(3):  # Not fetched: never charged, however often.
      asyncio.run(call(fetch=False))
    assert not [a for a in _audit(silo) if a.event == 'executed']

    async def evicted():
      """A call on executor 1, then 64 more executors: executor 1's values
      leave the gate's view and must not be released uncharged."""
      first_channel, first = _remote_executor(env, silo, len(ids))
      others = []
      try:
        fn = await first.create_value(native, native.type_signature)
        result = await first.create_call(fn, await first.create_value(ids, ids_type))
        for _ in range(64):
          others.append(_remote_executor(env, silo, len(ids)))
        return await result.compute()
      finally:
        for channel, executor in [(first_channel, first)] + others:
          executor.close()
          channel.close()

    with pytest.raises(Exception) as e:
      asyncio.run(evicted())
    assert 'does not track (disposed or evicted)' in _error_text(e.value)
    assert not [a for a in _audit(silo) if a.event == 'executed']
    assert asyncio.run(call(fetch=True)) > 0
    assert asyncio.run(call(fetch=True)) > 0
    with pytest.raises(Exception) as e:  # Budget spent: the third result is not released.
      asyncio.run(call(fetch=True))
    assert 'has used all 2 approved rounds' in _error_text(e.value)
    executed = [a for a in _audit(silo) if a.event == 'executed']
    assert [a.detail['call'] for a in executed] == [1, 2]

    # A computation that fails on the data releases its failure: charged too,
    # and its error reaches the caller without the tensor values it quotes.
    failing = _request('failing', [('train_round', _computations()['failing'])], rounds=2)
    _submit(env, silo, failing)
    _approve(env, silo, failing.study_id)
    for _ in range(2):
      with pytest.raises(Exception) as e:
        _run_on(env, silo, _computations()['failing'], ids)
      assert 'assertion failed' in _error_text(e.value).lower(), _error_text(e.value)
      assert '[…]' in _error_text(e.value)
    with pytest.raises(Exception) as e:
      _run_on(env, silo, _computations()['failing'], ids)
    assert 'has used all 2 approved rounds' in _error_text(e.value)
    charged = [a for a in _audit(silo) if a.event == 'executed' and a.study_id == failing.study_id]
    assert len(charged) == 2
  finally:
    silo.stop()


def _cohort_examples(data_dir):
  """A cohort-engine-shaped computation: each CLIENTS value is a cohort 'u1,u2,...', its
  users' records read and stacked by fedpipe's cohort reader; releases their example count."""
  import numpy as np
  import tensorflow as tf
  import tensorflow_federated as tff

  from fedpipe.computations import cohort_data, cohort_fedavg
  from fedpipe.data import manifest as manifest_lib

  manifest = manifest_lib.read_manifest(data_dir)
  cohort_fn = cohort_data.make_cohort_fn(
    split='train',
    num_features=manifest.num_features,
    batch_size=16,
    shuffle=False,
    storage=manifest.storage,
  )

  @tff.tensorflow.computation(np.str_)
  def examples(cohort):
    return tf.reduce_sum(cohort_fn(tf.strings.split(cohort, cohort_fedavg.SEPARATOR)).num_examples)

  @tff.federated_computation(tff.FederatedType(np.str_, tff.CLIENTS))
  def total(cohorts):
    return tff.federated_sum(tff.federated_map(examples, cohorts))

  return total


def test_a_hostile_coordinator_cannot_pass_too_few_repeated_or_foreign_users_off_as_cohorts(
  env, tmp_path
):
  """The gate counts and checks users, not CLIENTS values: a cohort 'u1,u2,u3' is three
  users, each of which must be this silo's, named once in the whole aggregate."""
  from fedpipe.data import manifest as manifest_lib

  silo = _governed_silo(env, tmp_path, 'cohorts')
  try:
    comp = _cohort_examples(env['data'])
    request = _request('cohorts', [('train_round', comp)], rounds=1)
    assert _submit(env, silo, request).violations == ()
    _approve(env, silo, request.study_id)
    u1, u2, u3 = _client_ids(env, 3)
    attacks = {
      # Two real users in one cohort, or in two: the policy needs three.
      f'{u1},{u2}': ([f'{u1},{u2}'], 'min_clients_per_aggregate=3'),
      'two cohorts of one': ([u1, u2], 'min_clients_per_aggregate=3'),
      # One user three times is one user, within a cohort or across cohorts.
      f'{u1},{u1},{u1}': ([f'{u1},{u1},{u1}'], 'client ids repeat within one aggregate'),
      'repeated across cohorts': (
        [f'{u1},{u2}', f'{u3},{u1}'],
        'client ids repeat within one aggregate',
      ),
      # Users this silo does not hold: another silo's, in either spelling.
      'another silo': ([f'{u1},{u2},silo-b/{u3}'], 'not held by silo silo-a: silo-b/'),
      'unknown user': ([f'{u1},{u2},user_9999'], 'not held by silo silo-a: user_9999'),
      # Empty ids padding a cohort to look bigger.
      'empty id': ([f'{u1},,{u2}'], 'name an empty client id'),
      'trailing separator': ([f'{u1},{u2},{u3},'], 'name an empty client id'),
      'empty cohort': ([f'{u1},{u2},{u3}', ''], 'name an empty client id'),
    }
    for name, (values, expected) in attacks.items():
      with pytest.raises(Exception) as e:
        _run_on(env, silo, comp, values)
      assert expected in _error_text(e.value), (name, _error_text(e.value))
    assert not [a for a in _audit(silo) if a.event == 'executed']
    refused = [a for a in _audit(silo) if a.event == 'refused']
    assert len(refused) >= len(attacks)
    # Three users, in two cohorts: enough, and each counted.
    counts = manifest_lib.read_manifest(env['data']).split('train').clients
    assert _run_on(env, silo, comp, [f'{u1},{u2}', u3]) == sum(counts[u] for u in (u1, u2, u3))
  finally:
    silo.stop()
  (executed,) = [a for a in _audit(silo) if a.event == 'executed']
  assert executed.detail['clients'] == sorted([u1, u2, u3])


def test_an_edited_budget_is_caught_by_the_silo_at_once_and_at_start(env, tmp_path):
  """Finding: `UPDATE studies SET rounds_used=0, rounds_approved=50` went unnoticed."""
  silo = _governed_silo(env, tmp_path, 'tamper')
  comps = _computations()
  ids = _client_ids(env, 5)
  try:
    request = _request('tamper', [('train_round', comps['total'])], rounds=2)
    _submit(env, silo, request)
    _approve(env, silo, request.study_id)
    _run_on(env, silo, comps['total'], ids)
    tamper_governance_db(silo.state_dir, 'UPDATE studies SET rounds_used = 0, rounds_approved = 50')
    with pytest.raises(Exception) as e:
      _run_on(env, silo, comps['total'], ids)
    assert 'TAMPERED' in _error_text(e.value)
    assert 'rounds_approved is 50 in the studies table but 2 in the audit log' in (
      _error_text(e.value)
    )
  finally:
    silo.stop()
  verify = _governance(env, silo, 'audit', '--verify')
  assert verify.returncode == 1 and 'rounds_used is 0 in the studies table but 1' in (verify.stderr)
  with pytest.raises(RuntimeError, match='TAMPERED'):
    silo.start()


def test_lifetime_epsilon_bounds_all_studies_together(env, tmp_path):
  """Finding: nothing bounded the ε spent on the same data across studies."""
  from fedpipe.governance import gate as governance_gate

  policy_path = tmp_path / 'lifetime.toml'
  policy_path.write_text(
    local_federation.DEMO_POLICY.replace(
      'max_lifetime_epsilon = 24.0', 'max_lifetime_epsilon = 9.0'
    )
  )
  policy = silo_policy.load_policy(str(policy_path))
  state = str(tmp_path / 'state')
  store = governance_store.GovernanceStore(state)
  gate = governance_gate.GovernanceGate(
    policy, store, client_ids=_client_ids(env, NUM_CLIENTS), silo_name='lifetime'
  )
  comps = _computations()
  # Three rounds of each: epsilon 6.1 alone (max_epsilon 8), 9.1 together.
  first = _request('first', [('train_round', comps['total'])], rounds=3)
  second = _request('second', [('train_round', comps['total_plus_one_op'])], rounds=3)
  for request in (first, second):
    study = gate.submit_study(request, 'coordinator')
    assert study.violations == [], study.review
  store.close()

  def governance(*args):
    return subprocess.run(
      [
        sys.executable,
        '-m',
        'fedpipe.cli.governance',
        f'--state_dir={state}',
        f'--policy={policy_path}',
        *args,
      ],
      cwd=REPO_ROOT,
      capture_output=True,
      text=True,
      timeout=300,
    )

  assert governance('approve', first.study_id).returncode == 0
  refused = governance('approve', second.study_id)
  assert refused.returncode == 2
  assert 'above max_lifetime_epsilon 9' in refused.stderr, refused.stderr
  budget = governance('budget')
  committed = float(re.search(r'committed \(rounds approved\): +([0-9.]+)', budget.stdout)[1])
  assert 0 < committed <= 9.0 and 'spent (rounds charged):      0.0000' in budget.stdout
  too_far = governance('extend', first.study_id, '--rounds=400', '--yes')
  assert too_far.returncode == 2 and 'max_lifetime_epsilon' in too_far.stderr


def test_strangers_get_no_answer_and_no_paths(env, silo):
  """Finding: a valid-CA caller not in `allowed_callers` got SERVING, and
  refusals quoted the policy file's path."""
  from grpc_health.v1 import health_pb2, health_pb2_grpc

  channel = _channel(env, silo, 'intruder')
  try:
    with pytest.raises(grpc.RpcError) as e:
      health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=''), timeout=30
      )
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as e:
      channel.unary_unary('/fedpipe.Silo/StudyStatus')(b'{}', timeout=30)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert env['policy'] not in e.value.details()
  finally:
    channel.close()
  with pytest.raises(Exception) as e:
    _run_on(env, silo, _computations()['total'], _client_ids(env, 5), who='intruder')
  assert "caller 'intruder' is not allowed" in _error_text(e.value)
  assert env['policy'] not in _error_text(e.value)
  good = _channel(env, silo)
  try:
    with pytest.raises(grpc.RpcError) as e:  # Domain errors, not a KeyError's repr.
      good.unary_unary('/fedpipe.Silo/StudyStatus')(b'{}', timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 'StudyStatus request ({"study_id": "<id>"}) has no field study_id' in e.value.details()
  finally:
    good.close()


def test_malformed_study_requests_are_answered_with_domain_errors(env, silo):
  """A raw gRPC client with a valid certificate attacks the study methods with malformed
  payloads: each is INVALID_ARGUMENT naming the field, an unknown study NOT_FOUND naming
  it, a stranger PERMISSION_DENIED whatever it sends; nothing is stored, the silo serves on."""
  from fedpipe.federation import silo_protocol

  valid = _request('attacked', [('train_round', _computations()['total'])]).to_json()

  def without(data, *path):
    data = json.loads(json.dumps(data))
    parent = data
    for key in path[:-1]:
      parent = parent[key]
    del parent[path[-1]]
    return data

  def garbled_proto(proto):
    data = json.loads(json.dumps(valid))
    data['computations'][0]['proto'] = proto
    return data

  invalid = {
    silo_protocol.STUDY_STATUS: [
      (b'{}', 'has no field study_id'),
      (b'{"study_id": 7}', 'field study_id must be a string, got a whole number'),
      (b'{"study_id": ""}', 'field study_id is empty'),
      (b'["study_id"]', 'must be a JSON object, got a list'),
      (b'not json', 'is not JSON'),
      (b'\xff\xfe', 'is not JSON'),
    ],
    silo_protocol.SUBMIT_STUDY: [
      (b'[]', 'must be a JSON object, got a list'),
      (b'{"format": "fedpipe-study/2"', 'is not JSON'),
      (json.dumps(without(valid, 'rounds')).encode(), 'has no field rounds'),
      (
        json.dumps(without(valid, 'privacy', 'noise_multiplier')).encode(),
        'has no field privacy.noise_multiplier',
      ),
      (json.dumps(dict(valid, rounds='2')).encode(), 'field rounds must be a whole number'),
      (json.dumps(dict(valid, computations=[])).encode(), 'at least one computation'),
      (
        json.dumps(garbled_proto('Cg==')).encode(),  # Valid base64, not a computation.
        'computations[0].proto is not a serialized TFF computation',
      ),
      (
        json.dumps(garbled_proto('')).encode(),  # An empty computation: TFF fails on it.
        'computations[0].proto is not a serialized TFF computation',
      ),
    ],
  }
  submitted_before = [a for a in _audit(silo) if a.event == 'study_submitted']

  def call(channel, method, payload):
    with pytest.raises(grpc.RpcError) as e:
      channel.unary_unary(silo_protocol.method_path(method))(payload, timeout=30)
    return e.value

  good = _channel(env, silo)
  stranger = _channel(env, silo, 'intruder')
  try:
    for method, cases in invalid.items():
      for payload, expected in cases:
        error = call(good, method, payload)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, payload, error)
        assert expected in error.details(), (method, payload, error.details())
        assert error.details().startswith('silo silo-a: ')
        for leak in ('KeyError', 'TypeError', 'Traceback', 'Exception calling application'):
          assert leak not in error.details()
        refused = call(stranger, method, payload)
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED, (method, payload, refused)
        assert "caller 'intruder' is not allowed" in refused.details()
    unknown = call(
      good,
      silo_protocol.STUDY_STATUS,
      silo_protocol.encode(silo_protocol.StudyStatusRequest('0123456789abcdef')),
    )
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    assert "no study 0123456789abcdef was submitted by 'coordinator'" in unknown.details()
    manifest = good.unary_unary(silo_protocol.method_path(silo_protocol.GET_MANIFEST))(
      b'', timeout=30
    )
    assert (
      silo_protocol.decode(silo_protocol.ManifestReply, manifest, what='reply').silo == 'silo-a'
    )
  finally:
    good.close()
    stranger.close()
  assert [a for a in _audit(silo) if a.event == 'study_submitted'] == submitted_before
  with open(silo.process.log_path) as f:
    logged = [json.loads(line) for line in f if line.startswith('{')]
  refusals = [e for e in logged if e.get('event') == 'study_request_refused']
  assert {e['code'] for e in refusals} >= {'INVALID_ARGUMENT', 'NOT_FOUND'}
  assert not [e for e in logged if e.get('event') == 'internal_error']
