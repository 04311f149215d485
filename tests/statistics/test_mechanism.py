"""The statistics query, its DP release (sensitivity, noise, threshold, ε) and the combination."""

import math

import dp_accounting
import numpy as np
import pytest
from scipy import stats as scipy_stats

from fedpipe.federation import local_federation
from fedpipe.governance import policy as silo_policy
from fedpipe.governance import privacy_ledger
from fedpipe.statistics import combine as combine_lib
from fedpipe.statistics import mechanism
from fedpipe.statistics import query as query_lib
from tests.statistics import draft_spec

SPEC = draft_spec.SPEC


def _query(**changes):
  fields = dict(
    name='q',
    feature_spec=SPEC,
    histogram_bins={'age': 8, 'income': 4},
    max_rows_per_user=5,
    noise_multiplier=1.5,
    threshold_delta=1e-7,
    releases=1,
  )
  fields.update(changes)
  return query_lib.StatisticsQuery(**fields)


def _exact(query, scale=1.0):
  return mechanism.ExactStatistics(
    rows=100.0 * scale,
    numeric={
      c.name: mechanism.NumericSums(
        sum=10.0 * scale, sum_of_squares=500.0 * scale, histogram=tuple([5.0 * scale] * c.bins)
      )
      for c in query.numeric
    },
    categorical={
      'region': {'north': 40.0, 'south': 30.0, 'lonely': 1.0},
      'device': {'ios': 50.0, 'android': 45.0},
    },
  )


def test_sensitivity_of_each_block_and_the_noise_on_it():
  q = _query()
  sens = mechanism.block_sensitivities(q)
  assert sens['rows'] == 5
  assert sens['sum/age'] == 5 * 41 and sens['sum_of_squares/age'] == 5 * 41**2
  assert sens['histogram/income'] == 5
  assert sens['categorical/region'] == 1 and sens['categorical/device'] == math.sqrt(2)
  assert mechanism.block_count(q) == 1 + 3 * 2 + 2
  noise = mechanism.noise(q)
  # Every block scaled to sensitivity 1: the whole vector has sqrt(B), noise z * sqrt(B).
  assert noise.sum['age'] == pytest.approx(1.5 * 3 * 5 * 41)
  assert noise.categorical['device'] == pytest.approx(1.5 * 3 * math.sqrt(2))
  # A value held by one user passes the threshold with probability delta_g / m_g.
  for name, m in (('region', 1), ('device', 2)):
    tail = scipy_stats.norm.sf((noise.thresholds[name] - 1) / noise.categorical[name])
    assert tail == pytest.approx(1e-7 / 2 / m, rel=1e-6)


def test_epsilon_is_dp_accountings_gaussian_at_delta_less_the_thresholding():
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(dp_accounting.GaussianDpEvent(1.5), 2)
  expected = accountant.get_epsilon(1e-5 - 2e-7)
  assert mechanism.epsilon(1.5, 1e-7, 2, delta=1e-5) == pytest.approx(expected)
  assert mechanism.epsilon(0.0, 0.0, 1, delta=1e-5) == math.inf
  assert mechanism.epsilon(1.5, 1e-5, 1, delta=1e-5) == math.inf  # Thresholding spent all of δ.
  assert privacy_ledger.study_epsilon(_query().privacy, 2, delta=1e-5) == pytest.approx(expected)


def test_lifetime_epsilon_composes_statistics_with_training():
  training = {
    'noise_multiplier': 1.0,
    'clipping': 'fixed',
    'clip_norm': 0.5,
    'sampling': 'poisson',
    'population_size': 100,
    'clients_per_round': 10,
    'accountant': 'rdp',
  }
  stats = _query(noise_multiplier=2.0).privacy
  alone = privacy_ledger.lifetime_epsilon([(training, 50)], delta=1e-5)
  stats_alone = privacy_ledger.lifetime_epsilon([(stats, 1)], delta=1e-5)
  both = privacy_ledger.lifetime_epsilon([(training, 50), (stats, 1)], delta=1e-5)
  assert max(alone, stats_alone) < both < alone + stats_alone
  assert stats_alone == pytest.approx(privacy_ledger.study_epsilon(stats, 1, delta=1e-5), rel=0.05)


def test_release_noise_has_the_stated_standard_deviation():
  """χ² over 400 releases x 26 values; the two-sided test at 1e-6 flakes once in 500,000 runs."""
  q = _query(noise_multiplier=0.7)
  exact = _exact(q)
  noise = mechanism.noise(q)
  rng = np.random.default_rng(0)
  z = []
  for _ in range(400):
    r = mechanism.release(exact, q, rng=rng)
    z.append((r['rows'] - exact.rows) / noise.rows)
    for c in q.numeric:
      e, got = exact.numeric[c.name], r['numeric'][c.name]
      z.append((got['sum'] - e.sum) / noise.sum[c.name])
      z.append((got['sum_of_squares'] - e.sum_of_squares) / noise.sum_of_squares[c.name])
      z += [(g - h) / noise.histogram[c.name] for g, h in zip(got['histogram'], e.histogram)]
  chi2 = float(np.sum(np.square(z)))
  low, high = scipy_stats.chi2.ppf([1e-6, 1 - 1e-6], df=len(z))
  assert low < chi2 < high


def test_thresholding_releases_common_values_and_never_a_lone_one_without_noise():
  q = _query(noise_multiplier=0.0)
  assert mechanism.noise(q).thresholds == {'region': 1.0, 'device': 1.0}
  r = mechanism.release(_exact(q), q)
  assert r['categorical']['region']['counts'] == {'north': 40.0, 'south': 30.0}
  assert r['rows'] == 100.0 and r['numeric']['age']['sum'] == 10.0


def test_query_id_is_its_content_and_differences_name_the_field():
  q = _query()
  assert q.study_id == query_lib.StatisticsQuery.from_json(q.to_json()).study_id
  wider = dict(SPEC, features=[dict(SPEC['features'][0], max=120.0)] + SPEC['features'][1:])
  other = _query(feature_spec=wider, noise_multiplier=0.5)
  assert other.study_id != q.study_id
  assert q.differences(other) == [
    "feature 'age' max: sent 120.0, approved 100.0",
    'noise_multiplier: sent 0.5, approved 1.5',
  ]
  assert q.fingerprint.startswith('statistics:')


def test_malformed_queries_name_the_field_and_the_fix():
  unbounded = dict(SPEC, features=[{'name': 'age', 'type': 'numeric', 'min': 0.0}])
  with pytest.raises(query_lib.StatisticsQueryError, match="'age'.*needs both bounds.*add"):
    _query(feature_spec=unbounded, histogram_bins={'age': 4}, threshold_delta=0.0)
  with pytest.raises(query_lib.StatisticsQueryError, match='threshold_delta must be > 0'):
    _query(threshold_delta=0.0)
  with pytest.raises(query_lib.StatisticsQueryError, match='histogram_bins.income'):
    _query(histogram_bins={'age': 8})
  with pytest.raises(query_lib.StatisticsQueryError, match='max_rows_per_user must be >= 1'):
    _query(max_rows_per_user=0)
  with pytest.raises(query_lib.StatisticsQueryError, match='privacy.mechanism'):
    query_lib.StatisticsQuery.from_json(dict(_query().to_json(), privacy={}))


def test_policy_statistics_section():
  policy = silo_policy.parse_policy(local_federation.DEMO_POLICY)
  assert policy.max_statistics_releases == 1 and not policy.allow_noise_free_statistics
  assert policy.statistics_violations(epsilon=2.0, noise_multiplier=1.0, releases=1) == []
  found = policy.statistics_violations(epsilon=9.0, noise_multiplier=0.0, releases=2)
  assert any('max_releases 1' in v for v in found) and any('noise-free' in v for v in found)
  closed = silo_policy.parse_policy(local_federation.DEMO_POLICY.split('[statistics]')[0])
  assert (
    'releases no feature statistics'
    in closed.statistics_violations(epsilon=1.0, noise_multiplier=1.0, releases=1)[0]
  )
  with pytest.raises(silo_policy.PolicyError, match=r'\[statistics\] max_releases must be >= 0'):
    silo_policy.parse_policy(
      local_federation.DEMO_POLICY.replace('max_releases = 1', 'max_releases = -1')
    )


def test_combine_is_exact_without_noise_and_its_errors_match_monte_carlo():
  q = _query(noise_multiplier=0.0)
  rng = np.random.default_rng(1)
  ages = {s: rng.uniform(18, 100, size=n) for s, n in (('a', 300), ('b', 500))}
  age = q.numeric[0]

  def exact(values):
    return mechanism.ExactStatistics(
      rows=float(len(values)),
      numeric={
        c.name: mechanism.NumericSums(
          float((values - c.center).sum()) if c.name == 'age' else 0.0,
          float(((values - c.center) ** 2).sum()) if c.name == 'age' else 0.0,
          tuple(float(h) for h in np.histogram(values, bins=c.bins, range=(c.min, c.max))[0])
          if c.name == 'age'
          else (0.0,) * c.bins,
        )
        for c in q.numeric
      },
      categorical={'region': {'north': 3.0, 'x': 1.0}, 'device': {'ios': 2.0}},
    )

  releases = {s: mechanism.release(exact(v), q) for s, v in ages.items()}
  combined = combine_lib.combine(q, releases)
  pooled = np.concatenate(list(ages.values()))
  assert combined.numeric['age'].mean == pytest.approx(pooled.mean(), rel=1e-12)
  assert combined.numeric['age'].std == pytest.approx(pooled.std(), rel=1e-9)
  assert combined.categorical['region'].vocabulary == ('north',)
  assert combined.numeric['age'].mean_se == 0
  assert age.bin_edges()[0] <= combined.numeric['age'].clip_low < combined.numeric['age'].clip_high
  # With noise: the delta method's standard errors against the spread of 300 releases.
  noisy = _query(noise_multiplier=0.05)
  means, stds, ses = [], [], []
  for _ in range(300):
    c = combine_lib.combine(
      noisy, {s: mechanism.release(exact(v), noisy, rng=rng) for s, v in ages.items()}
    ).numeric['age']
    means.append(c.mean), stds.append(c.std), ses.append((c.mean_se, c.std_se))
  mean_se, std_se = np.mean(ses, axis=0)
  assert np.std(means) == pytest.approx(mean_se, rel=0.2)
  assert np.std(stds) == pytest.approx(std_se, rel=0.2)
