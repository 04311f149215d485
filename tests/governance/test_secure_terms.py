"""A study's secure-aggregation terms as a silo reviews and accounts for them."""

import numpy as np
import pytest

from fedpipe.computations import distributed_dp_accounting
from fedpipe.federation import key_agreement, local_federation
from fedpipe.governance import gate as governance_gate
from fedpipe.governance import policy as silo_policy
from fedpipe.governance import privacy_ledger, secure_terms, study_request

ROSTER = ('silo-a', 'silo-b', 'silo-c')
DIM = 3 * 4 + 4  # The noised tensors of `_train_round`.
PRIVACY = {
  'noise_multiplier': 1.0,
  'clipping': 'fixed',
  'clip_norm': 1.0,
  'delta': 1e-5,
  'epsilon': None,
  'accountant': 'rdp',
  'sampling': 'poisson',
  'population_size': 300,
  'clients_per_round': 30,
}


def _terms(**changes):
  values = dict(
    roster=ROSTER,
    max_colluding=1,
    noise_multiplier=1.0,
    scale=2.0**16,
    dim=DIM,
    noised_path=(1,),
  )
  values.update(changes)
  return secure_terms.SecureAggregationTerms(**values)


def _secure(terms=None, **privacy):
  return dict(PRIVACY, secure_aggregation=(terms or _terms()).to_json(), **privacy)


@pytest.fixture(scope='module')
def train_round():
  """A computation shaped like DP-FedAvg's silo half: <metrics, update sum>@SERVER."""
  import tensorflow as tf
  import tensorflow_federated as tff

  from fedpipe.runtime import execution_context

  @tff.tensorflow.computation(np.str_)
  def work(client_id):
    del client_id
    return (tf.zeros([2]), (tf.zeros([3, 4]), tf.zeros([4])))

  @tff.federated_computation(tff.FederatedType(np.str_, tff.CLIENTS))
  def train(client_ids):
    return tff.federated_sum(tff.federated_map(work, client_ids))

  return execution_context.wire_computation(train)


def _request(train_round, privacy):
  return study_request.StudyRequest(
    name='secure',
    rounds=10,
    model={'name': 'none', 'parameters': 0},
    privacy=privacy,
    computations=(study_request.StudyComputation(study_request.ROLE_TRAIN, train_round),),
  )


def _policy(section=''):
  return silo_policy.parse_policy(local_federation.DEMO_POLICY + section)


def _review(train_round, privacy, policy=None, silo='silo-b'):
  return governance_gate.review_study(
    _request(train_round, privacy),
    policy or _policy(),
    silo_clients=100,
    silo_name=silo,
  )['violations']


def test_the_protocol_names_agree():
  assert secure_terms.PROTOCOL == key_agreement.PROTOCOL_VERSION


def test_terms_round_trip_through_a_request_and_bad_fields_are_named(train_round):
  request = _request(train_round, _secure())
  parsed = study_request.StudyRequest.from_json(request.to_json())
  assert secure_terms.terms_of(parsed.privacy) == _terms()
  assert parsed.study_id == request.study_id
  central = _request(train_round, dict(PRIVACY))
  assert central.study_id != request.study_id
  assert 'secure_aggregation' not in central.identity()['privacy']
  for field, value, message in [
    ('max_colluding', 3, r'max_colluding must be in \[0, 2\]'),
    ('roster', ['silo-a'], 'at least two distinct silos'),
    ('bits', 32, 'bits must be 64'),
    ('scale', 'big', 'scale has the wrong type'),
    ('noise', 'skellam', "noise must be 'distributed_discrete_gaussian'"),
  ]:
    data = request.to_json()
    data['privacy']['secure_aggregation'][field] = value
    with pytest.raises(study_request.StudyRequestError, match=message):
      study_request.StudyRequest.from_json(data)


def test_a_silo_that_requires_secure_aggregation_refuses_a_central_study(train_round):
  strict = _policy('\n[secure_aggregation]\nrequire_secure_aggregation = true\nmin_roster = 3\n')
  (refusal,) = _review(train_round, dict(PRIVACY, sampling='poisson'), strict)
  assert 'requires secure aggregation' in refusal and 'unmasked' in refusal
  assert _review(train_round, _secure(), strict) == []
  assert _review(train_round, dict(PRIVACY)) == []  # The default policy accepts both.


def test_review_checks_the_roster_noise_and_the_noised_values_it_counts_itself(train_round):
  strict = _policy('\n[secure_aggregation]\nmin_roster = 4\n')
  cases = [
    (_secure(), strict, 'silo-b', 'needs at least min_roster = 4'),
    (_secure(), None, 'silo-x', 'does not name silo-x'),
    (_secure(_terms(noise_multiplier=0.0), noise_multiplier=0.0), None, 'silo-b', 'noise-free'),
    (_secure(_terms(noise_multiplier=2.0)), None, 'silo-b', 'differs from'),
    (_secure(_terms(dim=DIM + 1)), None, 'silo-b', f'training computation puts {DIM} values'),
    (_secure(_terms(noised_path=(0,), dim=2)), None, 'silo-b', None),
    (_secure(_terms(noised_path=(5,))), None, 'silo-b', 'does not lead into the result'),
    (_secure(sampling='fixed_size'), None, 'silo-b', 'Poisson sampling only'),
  ]
  for privacy, policy, silo, expected in cases:
    violations = _review(train_round, privacy, policy, silo)
    if expected is None:
      assert violations == []
    else:
      assert any(expected in v for v in violations), (expected, violations)


def test_a_noise_free_test_mode_needs_the_policy_to_allow_it(train_round):
  noise_free = _secure(_terms(noise_multiplier=0.0), noise_multiplier=0.0)
  lab = _policy('\n[secure_aggregation]\nallow_noise_free = true\n')
  assert not any('noise-free' in v for v in _review(train_round, noise_free, lab))


def test_the_ledger_charges_the_distributed_discrete_gaussian(train_round):
  del train_round
  terms = _terms()
  epsilon = privacy_ledger.study_epsilon(_secure(terms), 10, delta=1e-5)
  expected = distributed_dp_accounting.compute_epsilon(
    terms.mechanism(1.0), sampling_rate=0.1, rounds=10, delta=1e-5
  )
  assert epsilon == expected
  central = privacy_ledger.study_epsilon(dict(PRIVACY), 10, delta=1e-5)
  assert central < epsilon < 2 * central
  # Secure and central studies on the same data compose at common orders.
  both = privacy_ledger.lifetime_epsilon([(_secure(terms), 10), (dict(PRIVACY), 10)], delta=1e-5)
  assert max(epsilon, central) < both < epsilon + central
  # Central studies alone keep their numbers exactly.
  assert privacy_ledger.lifetime_epsilon([(dict(PRIVACY), 10)], delta=1e-5) == central


def test_a_study_naming_an_accountant_that_cannot_analyse_it_is_refused(train_round):
  # The accountant is the coordinator's claim: PLD for fixed-size sampling, or
  # a name the silo does not know, leaves the study without an epsilon.
  for privacy in (
    dict(PRIVACY, accountant='pld', sampling='fixed_size'),
    dict(PRIVACY, accountant='optimistic'),
  ):
    violations = _review(train_round, privacy)
    assert any('cannot be accounted for' in v for v in violations), privacy
  # PLD for what it can analyse: accepted, charged its (smaller) PLD epsilon.
  assert not _review(train_round, dict(PRIVACY, accountant='pld'))
  pld = privacy_ledger.study_epsilon(dict(PRIVACY, accountant='pld'), 10, delta=1e-5)
  assert pld < privacy_ledger.study_epsilon(dict(PRIVACY), 10, delta=1e-5)


def test_noise_shares_grow_when_a_round_has_fewer_silos():
  terms = _terms()
  full = terms.local_stddev(1.0, 3)
  assert terms.local_stddev(1.0, 2) == pytest.approx(full * np.sqrt(2))
  assert terms.total_stddev(1.0) == pytest.approx(full * np.sqrt(3 - 1))
  with pytest.raises(secure_terms.SecureTermsError, match='cannot hide anything'):
    terms.local_stddev(1.0, 1)


def test_the_policy_section_is_validated():
  with pytest.raises(silo_policy.PolicyError, match=r'\[secure_aggregation\] min_roster must be'):
    _policy('\n[secure_aggregation]\nmin_roster = 1\n')
  with pytest.raises(silo_policy.PolicyError, match='require is not a policy field'):
    _policy('\n[secure_aggregation]\nrequire = true\n')
