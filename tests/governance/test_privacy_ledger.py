"""A silo's lifetime ε: PLD when every study is central noise accounted with PLD, else RDP."""

import pytest

from fedpipe.computations import privacy_accounting
from fedpipe.governance import privacy_ledger

CENTRAL = {
  'noise_multiplier': 1.76,
  'clipping': 'fixed',
  'clip_norm': 0.3,
  'delta': 1e-5,
  'epsilon': None,
  'accountant': 'pld',
  'sampling': 'poisson',
  'population_size': 300,
  'clients_per_round': 60,
}


def test_one_pld_study_spends_its_own_epsilon_over_its_lifetime():
  study = privacy_ledger.study_epsilon(dict(CENTRAL), 100, delta=1e-5)
  assert study < 6.0
  assert privacy_ledger.lifetime_epsilon([(dict(CENTRAL), 100)], delta=1e-5) == study


def test_pld_studies_compose_with_pld_and_any_other_study_makes_it_rdp():
  later = dict(CENTRAL, noise_multiplier=1.2, clients_per_round=30)
  runs = [(1.76, _poisson(60), 100), (1.2, _poisson(30), 40)]
  both = privacy_ledger.lifetime_epsilon([(dict(CENTRAL), 100), (later, 40)], delta=1e-5)
  assert both == privacy_accounting.compose_epsilon(runs, delta=1e-5, accountant='pld')
  # An RDP-accounted study among them: everything composes with RDP (a larger ε).
  mixed = privacy_ledger.lifetime_epsilon(
    [(dict(CENTRAL), 100), (dict(later, accountant='rdp'), 40)], delta=1e-5
  )
  assert mixed == pytest.approx(privacy_accounting.compose_epsilon(runs, delta=1e-5))
  assert both < mixed


def _poisson(clients_per_round):
  return privacy_accounting.SamplingScheme('poisson', 300, clients_per_round)
