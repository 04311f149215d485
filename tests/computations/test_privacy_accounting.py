"""Reported ε is exactly dp-accounting's for the mechanism that ran."""

import dp_accounting
import pytest

from fedpipe.computations import privacy_accounting as pa


def test_poisson_epsilon_equals_dp_accounting_rdp():
  scheme = pa.SamplingScheme('poisson', population_size=300, clients_per_round=60)
  ours = pa.compute_epsilon(noise_multiplier=2.0, sampling=scheme, rounds=100, delta=1e-5)
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(
    dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(2.0)), 100
    )
  )
  assert ours == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
  assert ours == pytest.approx(5.496, abs=0.01)  # The figure quoted in the issue.


def test_fixed_size_uses_sampling_without_replacement_and_replace_one():
  scheme = pa.SamplingScheme('fixed_size', population_size=300, clients_per_round=60)
  ours = pa.compute_epsilon(noise_multiplier=2.0, sampling=scheme, rounds=100, delta=1e-5)
  accountant = dp_accounting.rdp.RdpAccountant(
    neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
  )
  accountant.compose(
    dp_accounting.SelfComposedDpEvent(
      dp_accounting.SampledWithoutReplacementDpEvent(300, 60, dp_accounting.GaussianDpEvent(2.0)),
      100,
    )
  )
  assert ours == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)


@pytest.mark.parametrize('method', ['poisson', 'fixed_size'])
def test_rdp_epsilon_after_each_round_equals_a_fresh_accountant(method):
  # ε is asked after every round; one round's RDP is computed once and
  # scaled. Each answer must equal a fresh accountant's, in any order.
  scheme = pa.SamplingScheme(method, population_size=300, clients_per_round=60)
  relation = (
    dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    if method == 'poisson'
    else dp_accounting.NeighboringRelation.REPLACE_ONE
  )
  for rounds in (1, 7, 1000, 2, 7):
    ours = pa.compute_epsilon(noise_multiplier=1.3, sampling=scheme, rounds=rounds, delta=1e-6)
    accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    accountant.compose(pa.run_event(1.3, scheme, rounds))
    assert ours == pytest.approx(accountant.get_epsilon(1e-6), rel=1e-12), rounds


def test_pld_epsilon_equals_dp_accounting_pld():
  # The cached one-round distribution, composed per call, must give what a
  # fresh PLD accountant gives for the whole run, in any order of rounds.
  scheme = pa.SamplingScheme('poisson', population_size=300, clients_per_round=60)
  for rounds in (50, 1, 7, 50):
    ours = pa.compute_epsilon(
      noise_multiplier=2.0, sampling=scheme, rounds=rounds, delta=1e-5, accountant='pld'
    )
    accountant = dp_accounting.pld.PLDAccountant(
      value_discretization_interval=pa.PLD_VALUE_DISCRETIZATION
    )
    accountant.compose(
      dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(2.0)), rounds
      )
    )
    assert ours == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9), rounds


def test_pld_grid_changes_epsilon_little_and_stays_below_rdp():
  # The coarser grid is still an upper bound close to the library's finer
  # default, and PLD is tighter than RDP for the same mechanism.
  scheme = pa.SamplingScheme('poisson', population_size=300, clients_per_round=60)
  fine = dp_accounting.pld.PLDAccountant()
  fine.compose(pa.run_event(1.76, scheme, 100))
  ours = pa.compute_epsilon(
    noise_multiplier=1.76, sampling=scheme, rounds=100, delta=1e-5, accountant='pld'
  )
  rdp = pa.compute_epsilon(noise_multiplier=1.76, sampling=scheme, rounds=100, delta=1e-5)
  assert fine.get_epsilon(1e-5) <= ours <= fine.get_epsilon(1e-5) * (1 + 1e-4)
  assert ours < 6.0 < rdp


def test_epsilon_grows_with_rounds_and_edge_cases():
  scheme = pa.SamplingScheme('poisson', population_size=100, clients_per_round=10)
  eps = [
    pa.compute_epsilon(noise_multiplier=1.0, sampling=scheme, rounds=r, delta=1e-5)
    for r in (1, 10, 100)
  ]
  assert eps[0] < eps[1] < eps[2]
  assert pa.compute_epsilon(noise_multiplier=1.0, sampling=scheme, rounds=0, delta=1e-5) == 0
  assert pa.compute_epsilon(noise_multiplier=0.0, sampling=scheme, rounds=1, delta=1e-5) == float(
    'inf'
  )


@pytest.mark.parametrize('accountant', ['rdp', 'pld'])
def test_noise_multiplier_for_epsilon_inverts_compute_epsilon(accountant):
  scheme = pa.SamplingScheme('poisson', population_size=300, clients_per_round=60)
  z = pa.noise_multiplier_for_epsilon(
    target_epsilon=4.0, sampling=scheme, rounds=80, delta=1e-5, accountant=accountant
  )
  eps = pa.compute_epsilon(
    noise_multiplier=z, sampling=scheme, rounds=80, delta=1e-5, accountant=accountant
  )
  assert eps <= 4.0
  assert eps == pytest.approx(4.0, abs=0.01)


def test_pld_cannot_analyse_fixed_size_sampling():
  scheme = pa.SamplingScheme('fixed_size', population_size=30, clients_per_round=3)
  with pytest.raises(pa.PrivacyAccountingError, match='pld'):
    pa.compute_epsilon(
      noise_multiplier=1.0, sampling=scheme, rounds=3, delta=1e-5, accountant='pld'
    )


@pytest.mark.parametrize(
  'kwargs,match',
  [
    (dict(method='random', population_size=10, clients_per_round=1), 'sampling'),
    (dict(method='poisson', population_size=0, clients_per_round=1), 'population_size'),
    (dict(method='poisson', population_size=10, clients_per_round=11), 'clients_per_round'),
  ],
)
def test_sampling_scheme_validation_names_the_field(kwargs, match):
  with pytest.raises(pa.PrivacyAccountingError, match=match):
    pa.SamplingScheme(**kwargs)


def test_composing_studies_adds_their_rdp_curves():
  poisson = pa.SamplingScheme('poisson', 300, 60)
  fixed = pa.SamplingScheme('fixed_size', 30, 10)
  alone = pa.compute_epsilon(noise_multiplier=1.0, sampling=poisson, rounds=20, delta=1e-5)
  halves = pa.compose_epsilon([(1.0, poisson, 10), (1.0, poisson, 10)], delta=1e-5)
  assert halves == pytest.approx(alone, rel=1e-12)
  one = pa.compose_epsilon([(1.0, poisson, 20)], delta=1e-5)
  both = pa.compose_epsilon([(1.0, poisson, 20), (1.5, fixed, 5)], delta=1e-5)
  assert both > one
  assert pa.compose_epsilon([(1.0, poisson, 0)], delta=1e-5) == 0.0
  assert pa.compose_epsilon([(0.0, poisson, 1)], delta=1e-5) == float('inf')


def test_pld_composition_of_runs_is_what_the_pld_accountant_gives_for_them_together():
  population = pa.SamplingScheme('poisson', population_size=300, clients_per_round=60)
  smaller = pa.SamplingScheme('poisson', population_size=300, clients_per_round=30)
  one = pa.compose_epsilon([(1.76, population, 100)], delta=1e-5, accountant='pld')
  assert one == pa.compute_epsilon(
    noise_multiplier=1.76, sampling=population, rounds=100, delta=1e-5, accountant='pld'
  )
  both = pa.compose_epsilon(
    [(1.76, population, 100), (1.2, smaller, 40)], delta=1e-5, accountant='pld'
  )
  accountant = pa.make_accountant('pld', population)
  accountant.compose(pa.run_event(1.76, population, 100))
  accountant.compose(pa.run_event(1.2, smaller, 40))
  assert both == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
  rdp = pa.compose_epsilon([(1.76, population, 100), (1.2, smaller, 40)], delta=1e-5)
  assert one < both < rdp
  fixed = pa.SamplingScheme('fixed_size', population_size=300, clients_per_round=30)
  with pytest.raises(pa.PrivacyAccountingError, match='pld'):
    pa.compose_epsilon([(1.0, fixed, 5)], delta=1e-5, accountant='pld')
