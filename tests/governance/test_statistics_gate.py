"""The silo's statistics checks that need a governance state of a given shape, in process.

The gate is the silo's own object; its inputs are what a hostile coordinator
sends (a study id and a query), its statistics source stands for the silo's
pipeline and counts how often it runs.
"""

import pytest

from fedpipe.federation import local_federation
from fedpipe.governance import gate as governance_gate
from fedpipe.governance import policy as silo_policy
from fedpipe.governance import store as governance_store
from fedpipe.pipelines import feature_statistics
from fedpipe.statistics import mechanism
from fedpipe.statistics import query as query_lib

POLICY = local_federation.DEMO_POLICY.replace(
  'max_lifetime_epsilon = 24.0', 'max_lifetime_epsilon = 12.0'
).replace(
  '[statistics]\nmax_releases = 1\n', '[statistics]\nmax_releases = 1\nallow_noise_free = true\n'
)
SPEC = {
  'schema_version': 2,
  'client_key': 'user',
  'label': {'name': 'y', 'task': 'binary'},
  'features': [{'name': 'age', 'type': 'numeric', 'min': 18.0, 'max': 100.0}],
}
TRAINING = {
  'noise_multiplier': 0.8,
  'clipping': 'fixed',
  'clip_norm': 0.5,
  'delta': 1e-5,
  'epsilon': None,
  'accountant': 'rdp',
  'sampling': 'poisson',
  'population_size': 10,
  'clients_per_round': 10,
}


class _Source:
  def __init__(self, error=None):
    self.calls, self.error = 0, error

  def __call__(self, query):
    self.calls += 1
    if self.error:
      raise self.error
    return mechanism.ExactStatistics(
      rows=10.0, numeric={'age': mechanism.NumericSums(1.0, 2.0, (5.0, 5.0))}, categorical={}
    )


def _query(name, z):
  return query_lib.StatisticsQuery(
    name=name,
    feature_spec=SPEC,
    histogram_bins={'age': 2},
    max_rows_per_user=2,
    noise_multiplier=z,
    threshold_delta=0.0,
  )


@pytest.fixture
def silo(tmp_path):
  store = governance_store.GovernanceStore(str(tmp_path))
  source = _Source()
  gate = governance_gate.GovernanceGate(
    silo_policy.parse_policy(POLICY), store, client_ids=[], silo_name='silo-a', statistics=source
  )
  yield gate, store, source
  store.close()


def _approve(gate, store, query):
  gate.submit_statistics_study(query, 'coordinator')
  store.decide(query.study_id, approve=True, rounds=1)


def test_a_release_that_would_pass_the_lifetime_epsilon_is_withheld_before_it_runs(silo):
  gate, store, source = silo
  # A training study on the same data, approved around the review, has spent 3 rounds.
  store.submit(
    study_id='1' * 16,
    caller='coordinator',
    name='train',
    request={'privacy': TRAINING},
    review={},
    roles={'sha256:train': governance_store.ROLE_TRAIN},
  )
  store.decide('1' * 16, approve=True, rounds=3)
  for _ in range(3):
    store.charge('1' * 16, fingerprint='sha256:train', caller='coordinator', clients=['c'])
  query = _query('after-training', 1.0)
  _approve(gate, store, query)
  with pytest.raises(
    silo_policy.PolicyRefusalError, match='release withheld.*max_lifetime_epsilon 12'
  ):
    gate.release_statistics(query.study_id, query, 'coordinator')
  assert source.calls == 0 and store.get(query.study_id).rounds_used == 0
  assert store.audit()[-1].event == 'refused'


def test_a_release_the_policy_no_longer_allows_is_refused(silo, tmp_path):
  gate, store, source = silo
  query = _query('noise-free', 0.0)
  _approve(gate, store, query)  # Under the lab policy that allows the noise-free test mode.
  strict = governance_gate.GovernanceGate(
    silo_policy.parse_policy(local_federation.DEMO_POLICY),
    store,
    client_ids=[],
    silo_name='silo-a',
    statistics=source,
  )
  with pytest.raises(silo_policy.PolicyRefusalError, match='no longer fits.*noise-free'):
    strict.release_statistics(query.study_id, query, 'coordinator')
  assert source.calls == 0
  released = gate.release_statistics(query.study_id, query, 'coordinator')
  assert released['release']['rows'] == 10.0 and released['epsilon'] is None
  assert source.calls == 1


def test_a_failed_pipeline_releases_and_charges_nothing_and_says_where_to_look(tmp_path):
  store = governance_store.GovernanceStore(str(tmp_path))
  source = _Source(feature_statistics.StatisticsInputError('/srv/raw/secret.csv: header lacks'))
  gate = governance_gate.GovernanceGate(
    silo_policy.parse_policy(POLICY), store, client_ids=[], silo_name='silo-a', statistics=source
  )
  query = _query('failing', 1.0)
  _approve(gate, store, query)
  with pytest.raises(governance_gate.StatisticsUnavailableError) as e:
    gate.release_statistics(query.study_id, query, 'coordinator')
  assert "silo's log" in str(e.value) and 'secret.csv' not in str(e.value)
  assert store.get(query.study_id).rounds_used == 0
  store.close()


def test_another_callers_study_and_a_training_study_release_nothing(silo):
  gate, store, _ = silo
  query = _query('theirs', 1.0)
  _approve(gate, store, query)
  with pytest.raises(silo_policy.PolicyRefusalError, match="'someone' is not allowed"):
    gate.release_statistics(query.study_id, query, 'someone')
  store.submit(
    study_id='2' * 16,
    caller='coordinator',
    name='train',
    request={'privacy': TRAINING},
    review={},
    roles={'sha256:t2': governance_store.ROLE_TRAIN},
  )
  with pytest.raises(silo_policy.PolicyRefusalError, match='not a statistics study'):
    gate.release_statistics('2' * 16, query, 'coordinator')
