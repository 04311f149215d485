"""(ε, δ) of a DP-FedAvg run, from the mechanism that actually ran, with dp-accounting.

Each round samples clients (Poisson: each client independently with rate
q = clients_per_round / population; or a fixed-size sample without
replacement) and releases one Gaussian sum of noise multiplier z. The run is
that event composed `rounds` times. Poisson sampling is analysed under
add/remove-one-client neighbours, fixed-size sampling under replace-one (the
only relation dp-accounting supports for it, and the larger ε).

Two accountants: RDP (the default) and PLD, which is tighter (a lower ε for
the same noise, so less noise for the same ε) and supports Poisson sampling
only. Both give upper bounds on ε.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal

import dp_accounting
import numpy as np

from fedpipe.errors import FedpipeError

Sampling = Literal['poisson', 'fixed_size']
Accountant = Literal['rdp', 'pld']
SAMPLING_METHODS = ('poisson', 'fixed_size')
ACCOUNTANTS = ('rdp', 'pld')


# The PLD accountant's grid step for privacy losses. dp-accounting rounds
# losses up to the grid (its pessimistic estimate), so any step gives an
# upper bound on ε; 1e-3 instead of the library's 1e-4 makes an ε about ten
# times cheaper (ε is asked after every round) and moves it by about 1e-5
# relative at the demo's point.
PLD_VALUE_DISCRETIZATION = 1e-3


class PrivacyAccountingError(FedpipeError, ValueError):
  """The privacy parameters cannot be accounted for as given."""


@dataclasses.dataclass(frozen=True)
class SamplingScheme:
  """How clients are drawn each round, as the accountant sees it."""

  method: Sampling
  population_size: int
  clients_per_round: int

  def __post_init__(self):
    if self.method not in SAMPLING_METHODS:
      raise PrivacyAccountingError(
        f'sampling must be one of {SAMPLING_METHODS}, got {self.method!r}'
      )
    if self.population_size < 1:
      raise PrivacyAccountingError(f'population_size must be >= 1, got {self.population_size}')
    if not 1 <= self.clients_per_round <= self.population_size:
      raise PrivacyAccountingError(
        f'clients_per_round must be in [1, population_size={self.population_size}],'
        f' got {self.clients_per_round}'
      )

  @property
  def sampling_rate(self) -> float:
    return self.clients_per_round / self.population_size


def round_event(noise_multiplier: float, sampling: SamplingScheme) -> dp_accounting.DpEvent:
  """The DP event of one round."""
  gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
  if sampling.method == 'poisson':
    return dp_accounting.PoissonSampledDpEvent(sampling.sampling_rate, gaussian)
  return dp_accounting.SampledWithoutReplacementDpEvent(
    sampling.population_size, sampling.clients_per_round, gaussian
  )


def run_event(
  noise_multiplier: float, sampling: SamplingScheme, rounds: int
) -> dp_accounting.DpEvent:
  """The DP event of `rounds` rounds."""
  return dp_accounting.SelfComposedDpEvent(round_event(noise_multiplier, sampling), rounds)


def make_accountant(
  accountant: Accountant, sampling: SamplingScheme
) -> dp_accounting.PrivacyAccountant:
  """A fresh accountant for the sampling scheme's neighbouring relation.

  Raises:
    PrivacyAccountingError: If the accountant cannot analyse this sampling.
  """
  if sampling.method == 'poisson':
    relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
  else:
    relation = dp_accounting.NeighboringRelation.REPLACE_ONE
  if accountant == 'rdp':
    return dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
  if accountant == 'pld':
    if sampling.method != 'poisson':
      raise PrivacyAccountingError(
        'the pld accountant cannot analyse fixed_size sampling; use '
        'accountant=rdp or sampling=poisson'
      )
    return dp_accounting.pld.PLDAccountant(
      neighboring_relation=relation, value_discretization_interval=PLD_VALUE_DISCRETIZATION
    )
  raise PrivacyAccountingError(f'accountant must be one of {ACCOUNTANTS}, got {accountant!r}')


def compute_epsilon(
  *,
  noise_multiplier: float,
  sampling: SamplingScheme,
  rounds: int,
  delta: float,
  accountant: Accountant = 'rdp',
) -> float:
  """ε after `rounds` rounds at `delta`; `inf` without noise; 0 for 0 rounds.

  Raises:
    PrivacyAccountingError: If a parameter is out of range.
  """
  if not 0 < delta < 1:
    raise PrivacyAccountingError(f'delta must be in (0, 1), got {delta}')
  if rounds < 0:
    raise PrivacyAccountingError(f'rounds must be >= 0, got {rounds}')
  if noise_multiplier < 0:
    raise PrivacyAccountingError(f'noise_multiplier must be >= 0, got {noise_multiplier}')
  if rounds == 0:
    return 0.0
  if noise_multiplier == 0:
    return float('inf')
  return compose_epsilon([(noise_multiplier, sampling, rounds)], delta=delta, accountant=accountant)


def compose_epsilon(
  runs: Sequence[tuple[float, SamplingScheme, int]],
  *,
  delta: float,
  accountant: Accountant = 'rdp',
) -> float:
  """ε of several runs on the same data together, at `delta`.

  Each run is (noise multiplier, sampling, rounds), e.g. every study a silo
  approved. With 'rdp' their RDP curves add up at each order, as the RDP
  accountant composes different mechanisms, and ε follows with
  `rdp.compute_epsilon`; with 'pld' their privacy loss distributions are
  composed (Poisson sampling only), as the PLD accountant composes them.

  Returns:
    0 for no rounds at all; `inf` if any run with rounds has no noise.

  Raises:
    PrivacyAccountingError: If a parameter is out of range, or 'pld' is asked
      for a run that is not Poisson-sampled.
  """
  if not 0 < delta < 1:
    raise PrivacyAccountingError(f'delta must be in (0, 1), got {delta}')
  total = None
  orders = None
  for noise_multiplier, sampling, rounds in runs:
    if rounds < 0 or noise_multiplier < 0:
      raise PrivacyAccountingError(
        f'rounds and noise_multiplier must be >= 0, got {rounds} and {noise_multiplier}'
      )
    if rounds == 0:
      continue
    if noise_multiplier == 0:
      return float('inf')
    if accountant != 'rdp':
      make_accountant(accountant, sampling)  # Fails on what it cannot analyse.
    if accountant == 'pld':
      # What the PLD accountant computes (one round's loss distribution
      # composed `rounds` times), with that distribution, the costly part,
      # built once per mechanism: ε is asked after every round.
      run = _one_round_pld(noise_multiplier, sampling).self_compose(rounds)
      total = run if total is None else total.compose(run)
      continue
    # What the RDP accountant computes (rounds x one round's RDP), with one
    # round's RDP computed once per mechanism.
    orders, one_round = _one_round_rdp(noise_multiplier, sampling)
    total = rounds * one_round if total is None else total + rounds * one_round
  if total is None:
    return 0.0
  if accountant == 'pld':
    return float(total.get_epsilon_for_delta(delta))
  return float(dp_accounting.rdp.compute_epsilon(orders, total, delta)[0])


@functools.lru_cache(maxsize=32)
def _one_round_rdp(
  noise_multiplier: float, sampling: SamplingScheme
) -> tuple[np.ndarray, np.ndarray]:
  """The RDP accountant's orders and the RDP of one round at each of them."""
  acc = make_accountant('rdp', sampling)
  acc.compose(round_event(noise_multiplier, sampling))
  orders, rdp = acc.orders, acc.rdp  # Copies, made read-only: they are cached.
  orders.flags.writeable = False
  rdp.flags.writeable = False
  return orders, rdp


@functools.lru_cache(maxsize=32)
def _one_round_pld(
  noise_multiplier: float, sampling: SamplingScheme
) -> dp_accounting.pld.privacy_loss_distribution.PrivacyLossDistribution:
  """One Poisson-sampled Gaussian round's privacy loss distribution, as `PLDAccountant` builds it."""
  return dp_accounting.pld.privacy_loss_distribution.from_gaussian_mechanism(
    standard_deviation=noise_multiplier,
    value_discretization_interval=PLD_VALUE_DISCRETIZATION,
    sampling_prob=sampling.sampling_rate,
  )


def noise_multiplier_for_epsilon(
  *,
  target_epsilon: float,
  sampling: SamplingScheme,
  rounds: int,
  delta: float,
  accountant: Accountant = 'rdp',
) -> float:
  """The smallest noise multiplier whose run stays within `target_epsilon`.

  Raises:
    PrivacyAccountingError: If a parameter is out of range or no noise
      multiplier up to 1e3 reaches the target.
  """
  if not target_epsilon > 0:
    raise PrivacyAccountingError(f'target_epsilon must be > 0, got {target_epsilon}')
  if rounds < 1:
    raise PrivacyAccountingError(f'rounds must be >= 1, got {rounds}')
  make_accountant(accountant, sampling)  # Fails early on bad combinations.

  def calibrate(acc: Accountant, bracket) -> float:
    return float(
      dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(acc, sampling),
        lambda z: run_event(z, sampling, rounds),
        target_epsilon,
        delta,
        bracket_interval=bracket,
        tol=1e-4,
      )
    )

  try:
    z_rdp = calibrate('rdp', dp_accounting.LowerEndpointAndGuess(1e-3, 1.0))
    if accountant == 'rdp':
      return z_rdp
    # PLD is tighter than RDP (z_pld <= z_rdp) but its cost explodes for tiny
    # noise, so search below the RDP answer only.
    try:
      return calibrate('pld', dp_accounting.ExplicitBracketInterval(0.5 * z_rdp, z_rdp))
    except ValueError:
      return calibrate('pld', dp_accounting.ExplicitBracketInterval(0.2 * z_rdp, z_rdp))
  except (ValueError, RuntimeError) as e:
    raise PrivacyAccountingError(
      f'no noise multiplier reaches epsilon={target_epsilon} at delta={delta} '
      f'over {rounds} rounds: {e}'
    ) from e
