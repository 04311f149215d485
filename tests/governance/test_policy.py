"""Silo policy files alone: parsing, the errors naming each field, safe defaults."""

import pytest

from fedpipe.federation import local_federation
from fedpipe.governance import policy as silo_policy


def test_policy_errors_name_each_field():
  with pytest.raises(silo_policy.PolicyError) as e:
    silo_policy.parse_policy(
      'allowed_callers = []\n[privacy]\ndelta = 2\nmax_epsilon = "8"\n'
      '[training]\nmax_rounds = 10\nbogus = 1\n',
      source='p.toml',
    )
  message = str(e.value)
  for expected in (
    'allowed_callers must be a non-empty list',
    'max_epsilon must be a float',
    'min_noise_multiplier is missing',
    'bogus is not a policy field',
    'min_clients_per_aggregate is missing',
  ):
    assert expected in message
  policy = silo_policy.parse_policy(local_federation.DEMO_POLICY)
  assert policy.allows_caller('coordinator') and not policy.allows_caller('intruder')
  assert policy.allow_unnoised_metrics and policy.max_evaluations == 20
  with pytest.raises(silo_policy.PolicyError, match='max_lifetime_epsilon 4.0 is below'):
    silo_policy.parse_policy(
      local_federation.DEMO_POLICY.replace(
        'max_lifetime_epsilon = 24.0', 'max_lifetime_epsilon = 4.0'
      )
    )
  strict = silo_policy.parse_policy(
    local_federation.DEMO_POLICY.split('[evaluation]')[0].replace('max_lifetime_epsilon = 24.0', '')
  )
  assert strict.max_lifetime_epsilon == strict.max_epsilon  # Safe defaults.
  assert not strict.allow_unnoised_metrics and strict.max_evaluations == 0
  assert strict.evaluation_violations(1)
