"""Federated statistics across three real governed silos over mutual TLS, and attacks on them.

Three silos run in statistics-only mode (no preprocessed data, only
`--raw_data`: CSV at two, JSONL at one), a fourth has preprocessed data and
no raw data. The coordinator is `fedpipe-stats` (a subprocess) or this test
through `SiloConnection`, the data owners approve with `fedpipe-governance`
or their governance store.
"""

import concurrent.futures
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as scipy_stats

from fedpipe.data import client_data_writer
from fedpipe.federation import certificates, cross_silo, local_federation, statistics_study
from fedpipe.federation import tls as tls_lib
from fedpipe.governance import store as governance_store
from fedpipe.statistics import combine as combine_lib
from fedpipe.statistics import mechanism
from fedpipe.statistics import query as query_lib
from tests.conftest import REPO_ROOT, log_events
from tests.statistics import draft_spec

pytestmark = pytest.mark.slow

SILOS = ('silo-a', 'silo-b', 'silo-c')
LAB_POLICY = local_federation.DEMO_POLICY.replace(
  '[statistics]\nmax_releases = 1\n', '[statistics]\nmax_releases = 2\nallow_noise_free = true\n'
)
SPEC = draft_spec.SPEC
COLUMNS = draft_spec.COLUMNS
BINS = 10
MAX_ROWS = 5


def _silo_rows(s):
  """A silo's valid rows: 40-60 users, 1..5 rows each; one lone value per silo a and b."""
  rng = np.random.default_rng(100 + s)
  rows = []
  for u in range(int(rng.integers(40, 61))):
    user = f's{s}u{u}'
    region = ('north', 'south', 'east')[u % 3]
    devices = (('ios',), ('android',), ('ios', 'android'))[u % 3]
    mean_age = 35 + 10 * s  # The silos' distributions differ.
    for i in range(int(rng.integers(1, MAX_ROWS, endpoint=True))):
      rows.append(
        {
          'user': user,
          'age': round(float(np.clip(rng.normal(mean_age, 12), 18, 100)), 3),
          'income': round(float(rng.uniform(0, 200)), 2),
          'region': 'atlantis' if (s, u) == (0, 7) else region,
          'device': 'pager' if (s, u) == (1, 4) else devices[i % len(devices)],
          'y': int(rng.integers(0, 2)),
        }
      )
  return rows


@pytest.fixture(scope='module')
def federation(tmp_path_factory):
  root = tmp_path_factory.mktemp('statistics')
  rows = {name: _silo_rows(s) for s, name in enumerate(SILOS)}
  raw = {}
  for name in ('silo-a', 'silo-b'):
    os.makedirs(root / name)
    half = len(rows[name]) // 2
    for part, chunk in (('1', rows[name][:half]), ('2', rows[name][half:])):
      with open(root / name / f'part{part}.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, COLUMNS, lineterminator='\n')
        writer.writeheader()
        writer.writerows(chunk)
        if part == '2':
          f.write('bad,not-a-number,1,north,ios,0\n')
    raw[name] = (str(root / name / '*.csv'), None)
  os.makedirs(root / 'silo-c')
  with open(root / 'silo-c' / 'records.data', 'w') as f:
    for r in rows['silo-c']:
      f.write(json.dumps(r) + '\n')
    f.write('{not json\n')
  raw['silo-c'] = (str(root / 'silo-c' / 'records.data'), 'jsonl')
  processed = str(root / 'processed')
  client_data_writer.write_client_data(
    processed,
    {f'c{i}': (np.zeros((2, 4), np.float32), np.array([0, 1])) for i in range(4)},
    num_classes=2,
  )
  certs = local_federation.make_certs(str(root / 'certs'), [*SILOS, 'silo-d'])
  intruder = certificates.issue(
    certs.ca, str(root / 'certs'), common_name='intruder', kind='client'
  )
  policy = local_federation.write_policy(str(root / 'policy.toml'), LAB_POLICY)

  def start(name):
    data_dir, (raw_data, raw_format) = (
      (processed, (None, None)) if name == 'silo-d' else (None, raw[name])
    )
    return local_federation.start_silo(
      data_dir=data_dir,
      raw_data=raw_data,
      raw_format=raw_format,
      tls=certs.silo_tls(name),
      log_path=str(root / f'{name}.log'),
      policy=policy,
      state_dir=str(root / f'{name}-state'),
    )

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    futures = {name: pool.submit(start, name) for name in [*SILOS, 'silo-d']}
  processes = {name: f.result() for name, f in futures.items()}
  try:
    yield {
      'root': root,
      'rows': rows,
      'certs': certs,
      'intruder': intruder,
      'policy': policy,
      'silos': processes,
      'spec': _write(root / 'draft_spec.json', SPEC),
    }
  finally:
    for p in processes.values():
      p.stop()


def _write(path, data):
  with open(path, 'w') as f:
    json.dump(data, f)
  return str(path)


def _state(fed, name):
  return str(fed['root'] / f'{name}-state')


def _addresses(fed, names=SILOS):
  return [cross_silo.SiloAddress(name, fed['silos'][name].address) for name in names]


def _query(name, **changes):
  fields = dict(
    name=name,
    feature_spec=SPEC,
    histogram_bins={'age': BINS, 'income': BINS},
    max_rows_per_user=MAX_ROWS,
    noise_multiplier=0.0,
    threshold_delta=1e-7,
  )
  return query_lib.StatisticsQuery(**dict(fields, **changes))


def _approve_in_store(fed, study_id, names=SILOS, releases=1):
  for name in names:
    store = governance_store.GovernanceStore(_state(fed, name))
    try:
      store.decide(study_id, approve=True, rounds=releases)
    finally:
      store.close()


def _connection(fed, name, who='coordinator'):
  tls = fed['certs'].coordinator_tls()
  if who == 'intruder':
    tls = tls_lib.TlsFiles(
      ca=fed['certs'].ca.cert, cert=fed['intruder'].cert, key=fed['intruder'].key
    )
  return cross_silo.SiloConnection(cross_silo.SiloAddress(name, fed['silos'][name].address), tls)


def _stats_cli(fed, *args):
  certs = fed['certs']
  silos = ','.join(f'{a.name}={a.address}' for a in _addresses(fed))
  return subprocess.run(
    [
      sys.executable,
      '-m',
      'fedpipe.cli.stats',
      f'--feature_spec={fed["spec"]}',
      f'--silos={silos}',
      f'--tls_ca={certs.ca.cert}',
      f'--tls_cert={certs.coordinator.cert}',
      f'--tls_key={certs.coordinator.key}',
      f'--max_rows_per_user={MAX_ROWS}',
      f'--histogram_bins={BINS}',
      *args,
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    stdin=subprocess.DEVNULL,
  )


def _governance(fed, name, *args):
  return subprocess.Popen(
    [
      sys.executable,
      '-m',
      'fedpipe.cli.governance',
      f'--state_dir={_state(fed, name)}',
      f'--policy={fed["policy"]}',
      *args,
    ],
    cwd=REPO_ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    stdin=subprocess.DEVNULL,
  )


def _audit(fed, name):
  store = governance_store.GovernanceStore(_state(fed, name))
  try:
    return store.audit()
  finally:
    store.close()


def _exact_blocks(rows):
  """A silo's true released values (noise off), from its rows with plain numpy."""
  out = {'rows': float(len(rows))}
  for name, low, high in (('age', 18.0, 100.0), ('income', 0.0, 200.0)):
    x = np.array([float(r[name]) for r in rows])
    centred = x - (low + high) / 2
    out[f'sum/{name}'] = centred.sum()
    out[f'sum_of_squares/{name}'] = (centred**2).sum()
    bins = np.minimum(((x - low) / (high - low) * BINS).astype(int), BINS - 1)
    out[f'histogram/{name}'] = np.bincount(bins, minlength=BINS).astype(float)
  return out


def test_noise_free_statistics_equal_the_pooled_ones_and_are_charged_and_audited(federation):
  """(a) without noise, (c) the ledger and audit log of each silo, via the two programs."""
  fed = federation
  out = _stats_cli(fed, '--noise_multiplier=0', '--submit_only')
  assert out.returncode == 0, out.stderr
  study_id = out.stdout.split('study_id=')[1].split()[0]
  assert out.stdout.count('pending approval (it fits the silo policy)') == 3, out.stdout
  # Not approved yet: nothing is released, and the program says what to do.
  out = _stats_cli(fed, '--noise_multiplier=0', f'--output_dir={fed["root"] / "out"}')
  assert out.returncode == 3 and f'fedpipe-governance show {study_id}' in out.stderr
  shown = _governance(fed, 'silo-a', 'show', study_id).communicate(timeout=300)[0]
  assert 'clipped to [18, 100], 10 bins' in shown and 'at most 5 rows per user' in shown
  assert 'epsilon at the policy delta 1e-05: unbounded' in shown and 'fits' in shown
  approvals = [_governance(fed, name, 'approve', study_id) for name in SILOS]
  for p in approvals:
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    assert 'for 1 release(s)' in stdout
  out_dir = fed['root'] / 'out'
  out = _stats_cli(fed, '--noise_multiplier=0', f'--output_dir={out_dir}')
  assert out.returncode == 0, out.stderr
  assert 'every silo approved' in out.stdout and out.stdout.count('release 1 received') == 3
  spec = json.loads((out_dir / 'feature_spec.json').read_text())
  pooled = [r for name in SILOS for r in fed['rows'][name]]
  features = {f['name']: f for f in spec['features']}
  for name in ('age', 'income'):
    x = np.array([r[name] for r in pooled])
    assert features[name]['mean'] == pytest.approx(x.mean(), rel=1e-9)
    assert features[name]['std'] == pytest.approx(x.std(), rel=1e-9)
    assert (features[name]['min'], features[name]['max']) == (
      SPEC['features'][0 if name == 'age' else 1]['min'],
      SPEC['features'][0 if name == 'age' else 1]['max'],
    )
  # Values held by one user (atlantis, pager) are never released, even without noise.
  assert features['region']['vocabulary'] == ['east', 'north', 'south']
  assert features['device']['vocabulary'] == ['android', 'ios']
  report = json.loads((out_dir / 'statistics_report.json').read_text())
  assert sorted(report['silos']) == list(SILOS)
  assert report['combined']['numeric']['age']['mean_se'] == 0
  for name in ('age', 'income', 'region', 'device'):
    assert (out_dir / 'plots' / f'{name}.png').stat().st_size > 1000
  for name in SILOS:
    release = report['silos'][name]['release']
    assert release['rows'] == len(fed['rows'][name])
    executed = [a for a in _audit(fed, name) if a.event == 'executed' and a.study_id == study_id]
    assert len(executed) == 1
    detail = executed[0].detail
    assert detail['role'] == 'statistics' and detail['noise_free_test_mode'] is True
    assert detail['rows_kept'] == len(fed['rows'][name])
    assert detail['malformed'] == ({'bad_json': 1} if name == 'silo-c' else {'not_a_number': 1})
    assert log_events(fed['silos'][name].log_path, 'statistics_released')
  # A rerun finds the study's one release used: nothing more is released.
  out = _stats_cli(fed, '--noise_multiplier=0', f'--output_dir={out_dir}')
  assert out.returncode == 3
  assert 'all 1 approved releases are used' in out.stderr
  assert f'fedpipe-governance extend {study_id} --rounds=1' in out.stderr


def test_noisy_statistics_are_within_the_stated_error_and_charged_with_their_epsilon(federation):
  """(a) with noise, (c) the ε each silo charged.

  The χ² of the standardized noise of all 3 x 25 released counts, sums and bins is
  tested two-sided at 1e-6 each side (exact: the noise is Gaussian with the
  stated deviation): a false alarm once in 500,000 runs. Each federated mean
  and std is within 5 standard errors of the pooled value: 4 checks at
  5.7e-7 each under the delta method's normal approximation (the noise is a
  few percent of the sums here). Together: below 5e-6 per run.
  """
  fed = federation
  query = _query('noisy', noise_multiplier=1.0)
  statuses = statistics_study.run_statistics_study(
    _addresses(fed), fed['certs'].coordinator_tls(), query, submit_only=True
  )
  assert statuses == {}
  _approve_in_store(fed, query.study_id)
  replies = statistics_study.run_statistics_study(
    _addresses(fed), fed['certs'].coordinator_tls(), query
  )
  noise = mechanism.noise(query)
  z = []
  for name in SILOS:
    exact, release = _exact_blocks(fed['rows'][name]), replies[name].release
    z.append((release['rows'] - exact['rows']) / noise.rows)
    for f in ('age', 'income'):
      got = release['numeric'][f]
      z.append((got['sum'] - exact[f'sum/{f}']) / noise.sum[f])
      z.append((got['sum_of_squares'] - exact[f'sum_of_squares/{f}']) / noise.sum_of_squares[f])
      z += list((np.array(got['histogram']) - exact[f'histogram/{f}']) / noise.histogram[f])
  chi2 = float(np.sum(np.square(z)))
  low, high = scipy_stats.chi2.ppf([1e-6, 1 - 1e-6], df=len(z))
  assert len(z) == 75 and low < chi2 < high
  combined = combine_lib.combine(query, {n: r.release for n, r in replies.items()})
  pooled = [r for name in SILOS for r in fed['rows'][name]]
  for f in ('age', 'income'):
    x = np.array([r[f] for r in pooled])
    e = combined.numeric[f]
    assert abs(e.mean - x.mean()) < 5 * e.mean_se
    assert abs(e.std - x.std()) < 5 * e.std_se
  assert set(combined.categorical['region'].vocabulary) <= {'north', 'south', 'east'}
  expected = mechanism.epsilon(1.0, 1e-7, 1, delta=1e-5)
  for name in SILOS:
    assert replies[name].epsilon == pytest.approx(expected, abs=1e-5)
    (entry,) = [
      a for a in _audit(fed, name) if a.event == 'executed' and a.study_id == query.study_id
    ]
    assert entry.detail['epsilon'] == pytest.approx(expected, abs=1e-5)
    assert entry.detail['lifetime_epsilon'] >= entry.detail['epsilon'] - 1e-6


def _refusal(fn):
  with pytest.raises(cross_silo.SiloError) as e:
    fn()
  return str(e.value)


def test_a_hostile_coordinator_is_refused_at_every_silo_side_check(federation):
  """(d) each check, attacked from outside fedpipe-stats: SiloConnection calls of our own."""
  fed = federation
  query = _query('attacked', releases=1)
  wider = dict(SPEC, features=[dict(SPEC['features'][0], max=150.0)] + SPEC['features'][1:])
  conn = _connection(fed, 'silo-a')
  intruder = _connection(fed, 'silo-a', who='intruder')
  try:
    # A caller with a certificate from the federation's CA but not in allowed_callers.
    assert "'intruder' is not allowed" in _refusal(
      lambda: intruder.submit_statistics_study(query, timeout_s=60)
    )
    assert conn.submit_statistics_study(query, timeout_s=60).status == 'pending'
    assert "'intruder' is not allowed" in _refusal(
      lambda: intruder.release_statistics(query.study_id, query, timeout_s=60)
    )
    # Released before its owner approved it.
    assert f'study {query.study_id} is pending' in _refusal(
      lambda: conn.release_statistics(query.study_id, query, timeout_s=60)
    )
    _approve_in_store(fed, query.study_id, names=['silo-a'])
    # The approved study's id with other bounds, another noise, more rows per user.
    for changed, expected in (
      (_query('attacked', feature_spec=wider), "feature 'age' max: sent 150.0, approved 100.0"),
      (_query('attacked', noise_multiplier=0.5), 'noise_multiplier: sent 0.5, approved 0.0'),
      (_query('attacked', max_rows_per_user=50), 'max_rows_per_user: sent 50, approved 5'),
    ):
      message = _refusal(
        lambda changed=changed: conn.release_statistics(query.study_id, changed, timeout_s=60)
      )
      assert 'differs from the one approved' in message and expected in message
    assert conn.release_statistics(query.study_id, query, timeout_s=300).release_number == 1
    # A repeated release beyond the approved count.
    assert 'has used all 1 approved releases' in _refusal(
      lambda: conn.release_statistics(query.study_id, query, timeout_s=60)
    )
    # A study id this caller never submitted.
    assert 'no study 0123456789abcdef was submitted' in _refusal(
      lambda: conn.release_statistics('0123456789abcdef', query, timeout_s=60)
    )
    # A statistics-only silo serves no computations and has no manifest.
    with pytest.raises(cross_silo.SiloUnavailableError, match='statistics-only mode'):
      conn.fetch_manifest(timeout_s=60)
  finally:
    conn.close()
    intruder.close()
  refused = [
    a for a in _audit(fed, 'silo-a') if a.event == 'refused' and a.study_id == query.study_id
  ]
  assert len(refused) >= 5
  executed = [
    a for a in _audit(fed, 'silo-a') if a.event == 'executed' and a.study_id == query.study_id
  ]
  assert len(executed) == 1
  # A silo started without raw data refuses statistics studies, saying how to give it some.
  raw_less = _connection(fed, 'silo-d')
  try:
    message = _refusal(lambda: raw_less.submit_statistics_study(query, timeout_s=60))
    assert 'has no raw data' in message and '--raw_data=' in message
  finally:
    raw_less.close()


def test_a_study_that_breaks_the_policy_cannot_be_approved(federation):
  fed = federation
  query = _query('too-much', noise_multiplier=0.3, releases=3)
  conn = _connection(fed, 'silo-b')
  try:
    status = conn.submit_statistics_study(query, timeout_s=60)
  finally:
    conn.close()
  assert any('exceeds [statistics] max_releases 2' in v for v in status.violations)
  assert any('below min_noise_multiplier' in v for v in status.violations)
  p = _governance(fed, 'silo-b', 'approve', query.study_id)
  _, stderr = p.communicate(timeout=300)
  assert p.returncode == 2 and 'cannot be approved' in stderr and 'max_releases' in stderr
