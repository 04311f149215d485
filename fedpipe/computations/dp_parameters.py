"""The parameters of user-level DP-FedAvg, derived from the clients' data and the run's plan.

`dp_aggregator.CappedWeightDPFactory` needs, besides the noise multiplier
and the clipping, two numbers fixed before training (McMahan et al. 2018):
the weight cap (the client weight at which a client's capped weight reaches
1) and the expected total capped weight of a round (the fixed denominator).
`derive_dp_parameters` computes them, and the noise multiplier from a target
ε if asked, from plain arguments: the clients' example counts, the local
epochs and how clients are sampled. A client's weight is the number of
examples it trains on in its round (TFF's `ClientWeighting.NUM_EXAMPLES`):
its example count times the local epochs (batching drops no example).

    w_k     = n_k · epochs
    cap     = median_k w_k                      (unless given)
    W_exp   = q · Σ_k min(w_k / cap, 1)          (q: the sampling rate)

The median cap lets half the clients count fully while bounding the weight
of the largest; `W_exp` is exact in expectation under Poisson sampling and
for fixed-size sampling alike.

References:
  McMahan, Ramage, Talwar, Zhang. Learning Differentially Private Recurrent
  Language Models. ICLR 2018. https://arxiv.org/abs/1710.06963
  Andrew, Thakkar, McMahan, Ramaswamy. Differentially Private Learning with
  Adaptive Clipping. NeurIPS 2021. https://arxiv.org/abs/1905.03871
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import statistics
from collections.abc import Sequence
from typing import Literal

from fedpipe.computations import privacy_accounting
from fedpipe.errors import FedpipeError

Clipping = Literal['fixed', 'adaptive']
# TFF's default noise stddev of the clipped count under adaptive clipping, as
# a fraction of the expected clients per round
# (`tff.aggregators.differential_privacy.adaptive_clip_noise_params`).
DEFAULT_CLIPPED_COUNT_STDDEV_FRACTION = 0.05


class DPParametersError(FedpipeError, ValueError):
  """The DP parameters asked for are out of range or cannot be derived from the data."""


def _is_number(value: object) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_integer(value: object) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive(value: float, name: str) -> float:
  if not _is_number(value) or not value > 0:
    raise DPParametersError(f'{name} must be a positive number, got {value!r}')
  return float(value)


def _nonnegative(value: float, name: str) -> float:
  if not _is_number(value) or not value >= 0:
    raise DPParametersError(f'{name} must be a non-negative number, got {value!r}')
  return float(value)


@dataclasses.dataclass(frozen=True)
class AdaptiveClipping:
  """Adaptive clipping to a private quantile of the update norms (Andrew et al. 2021).

  Attributes:
    initial_clip_norm: The clip norm of the first round (> 0).
    target_unclipped_quantile: The fraction of updates to leave unclipped, in [0, 1].
    learning_rate: The geometric learning rate of the clip norm (>= 0).
    clipped_count_stddev: The noise stddev of the clipped count; `None` for
      TFF's default, `0.05` times the expected clients per round (0 without
      noise). `derive_dp_parameters` resolves it.

  Raises:
    DPParametersError: If a setting is out of range.
  """

  initial_clip_norm: float = 0.1
  target_unclipped_quantile: float = 0.5
  learning_rate: float = 0.2
  clipped_count_stddev: float | None = None

  def __post_init__(self):
    _positive(self.initial_clip_norm, 'initial_clip_norm')
    if not _is_number(self.target_unclipped_quantile) or not (
      0.0 <= self.target_unclipped_quantile <= 1.0
    ):
      raise DPParametersError(
        f'target_unclipped_quantile must be in [0, 1], got {self.target_unclipped_quantile!r}'
      )
    _nonnegative(self.learning_rate, 'learning_rate')
    if self.clipped_count_stddev is not None:
      _nonnegative(self.clipped_count_stddev, 'clipped_count_stddev')


@dataclasses.dataclass(frozen=True)
class DPParameters:
  """Everything DP-FedAvg's aggregator and accountant need, fixed before training.

  Pass its `dp_fedavg_arguments()` to `dp_fedavg.build_dp_fedavg_process`;
  account with `noise_multiplier`, `sampling`, `delta` and `accountant`
  (`privacy_accounting.compute_epsilon`).

  Attributes:
    noise_multiplier: Ratio of the Gaussian noise stddev to the clip norm (the
      total of the mechanism under adaptive clipping).
    delta: The δ of the (ε, δ) guarantee.
    accountant: The accountant ε is computed with (`rdp` or `pld`).
    target_epsilon: The ε the noise multiplier was calibrated to, if it was.
    rounds: The planned rounds, if given.
    sampling: How clients are drawn each round.
    weight_cap: Client weight at which a client's capped weight reaches 1.
    expected_total_weight: Expected sum of capped weights in a round: the
      fixed denominator of the DP mean.
    expected_clients_per_round: Expected number of clients in a round.
    clip_norm: The fixed clip norm; `None` under adaptive clipping.
    adaptive_clipping: The adaptive clipping settings, its clipped-count
      stddev resolved; `None` under fixed clipping.
  """

  noise_multiplier: float
  delta: float
  accountant: privacy_accounting.Accountant
  target_epsilon: float | None
  rounds: int | None
  sampling: privacy_accounting.SamplingScheme
  weight_cap: float
  expected_total_weight: float
  expected_clients_per_round: float
  clip_norm: float | None
  adaptive_clipping: AdaptiveClipping | None

  @property
  def clipping(self) -> Clipping:
    """`fixed` or `adaptive`."""
    return 'fixed' if self.adaptive_clipping is None else 'adaptive'

  def dp_fedavg_arguments(self) -> dict[str, object]:
    """The DP keyword arguments of `dp_fedavg.build_dp_fedavg_process`.

    Returns:
      `noise_multiplier`, `weight_cap`, `expected_total_weight`, `clip_norm`,
      `adaptive_clipping` and `expected_clients_per_round`, by name.
    """
    return {
      'noise_multiplier': self.noise_multiplier,
      'weight_cap': self.weight_cap,
      'expected_total_weight': self.expected_total_weight,
      'clip_norm': self.clip_norm,
      'adaptive_clipping': self.adaptive_clipping,
      'expected_clients_per_round': self.expected_clients_per_round,
    }


def _resolve_adaptive(
  adaptive: AdaptiveClipping, *, noise_multiplier: float, expected_clients_per_round: float
) -> AdaptiveClipping:
  """`adaptive` with TFF's default clipped-count stddev filled in, checked against the noise.

  Part of the noise budget goes to the clipped count: the update noise
  multiplier is `(z^-2 - (2 s)^-2)^-1/2` for total `z` and clipped-count
  stddev `s` (TFF's `adaptive_clip_noise_params`), which exists only if
  `z < 2 s`.
  """
  stddev = adaptive.clipped_count_stddev
  if stddev is None:
    stddev = (
      DEFAULT_CLIPPED_COUNT_STDDEV_FRACTION * expected_clients_per_round
      if noise_multiplier > 0.0
      else 0.0
    )
  if noise_multiplier > 0.0 and noise_multiplier >= 2 * stddev:
    raise DPParametersError(
      f'adaptive clipping cannot reach noise_multiplier={noise_multiplier} with '
      f'{expected_clients_per_round:g} expected clients per round: clipped_count_stddev = '
      f'{stddev:g} (defaults to {DEFAULT_CLIPPED_COUNT_STDDEV_FRACTION} * expected clients per '
      'round) must exceed half the noise multiplier; increase `clipped_count_stddev` or the '
      'clients per round, lower the noise multiplier, or use fixed clipping'
    )
  return dataclasses.replace(adaptive, clipped_count_stddev=stddev)


def derive_dp_parameters(
  *,
  client_example_counts: Sequence[float],
  clients_per_round: int,
  sampling: privacy_accounting.Sampling = 'poisson',
  local_epochs: int = 1,
  noise_multiplier: float | None = None,
  target_epsilon: float | None = None,
  rounds: int | None = None,
  delta: float = 1e-5,
  accountant: privacy_accounting.Accountant = 'rdp',
  clip_norm: float | None = None,
  adaptive_clipping: AdaptiveClipping | None = None,
  weight_cap: float | None = None,
) -> DPParameters:
  """Derives DP-FedAvg's parameters from the population and the run's plan.

  Args:
    client_example_counts: Each client's number of training examples, the
      whole population (its length is the population size).
    clients_per_round: Clients a round: the expected number under Poisson
      sampling, the exact one under fixed-size sampling.
    sampling: `poisson` (each client independently, at rate
      `clients_per_round / population`) or `fixed_size` (without replacement).
    local_epochs: Passes over its data a client makes in its round; its
      weight is its example count times this.
    noise_multiplier: The noise multiplier; exactly one of it and
      `target_epsilon`.
    target_epsilon: Calibrate the smallest noise multiplier whose `rounds`
      rounds stay within this ε at `delta`.
    rounds: The planned rounds; required with `target_epsilon`.
    delta: The δ of the guarantee, in (0, 1).
    accountant: `rdp` or `pld` (Poisson sampling only).
    clip_norm: Fixed clipping at this L2 norm; exactly one of it and
      `adaptive_clipping`.
    adaptive_clipping: Adaptive clipping (Andrew et al. 2021) with these settings.
    weight_cap: The weight cap; `None` for the median client weight.

  Returns:
    A frozen `DPParameters`.

  Raises:
    DPParametersError: If an argument is out of range, both or neither of a
      pair is set, or adaptive clipping cannot reach the noise multiplier
      with this many clients per round.
    privacy_accounting.PrivacyAccountingError: If the sampling cannot be
      accounted for (e.g. `pld` with `fixed_size`) or no noise multiplier
      reaches `target_epsilon`.
  """
  if not client_example_counts:
    raise DPParametersError('client_example_counts is empty: no clients to train on')
  for i, count in enumerate(client_example_counts):
    if not _is_number(count) or not count > 0:
      raise DPParametersError(
        f'client_example_counts[{i}] must be a positive number of examples, got {count!r}'
      )
  if not _is_integer(local_epochs) or local_epochs < 1:
    raise DPParametersError(f'local_epochs must be an integer >= 1, got {local_epochs!r}')
  if (noise_multiplier is None) == (target_epsilon is None):
    raise DPParametersError(
      'set exactly one of noise_multiplier and target_epsilon, got '
      f'{noise_multiplier!r} and {target_epsilon!r}'
    )
  if (clip_norm is None) == (adaptive_clipping is None):
    raise DPParametersError(
      'set exactly one of clip_norm (fixed clipping) and adaptive_clipping, got '
      f'{clip_norm!r} and {adaptive_clipping!r}'
    )
  if not _is_number(delta) or not 0 < delta < 1:
    raise DPParametersError(f'delta must be in (0, 1), got {delta!r}')
  if rounds is not None and (not _is_integer(rounds) or rounds < 1):
    raise DPParametersError(f'rounds must be an integer >= 1, got {rounds!r}')
  scheme = privacy_accounting.SamplingScheme(
    method=sampling,
    population_size=len(client_example_counts),
    clients_per_round=clients_per_round,
  )
  privacy_accounting.make_accountant(accountant, scheme)  # Fails early on bad combinations.

  if noise_multiplier is not None:
    noise = _nonnegative(noise_multiplier, 'noise_multiplier')
  else:
    target_epsilon = _positive(target_epsilon, 'target_epsilon')
    if rounds is None:
      raise DPParametersError('target_epsilon needs the planned rounds: set rounds')
    noise = privacy_accounting.noise_multiplier_for_epsilon(
      target_epsilon=target_epsilon,
      sampling=scheme,
      rounds=rounds,
      delta=delta,
      accountant=accountant,
    )

  client_weights = [float(count * local_epochs) for count in client_example_counts]
  cap = (
    _positive(weight_cap, 'weight_cap')
    if weight_cap is not None
    else float(statistics.median(client_weights))
  )
  expected_total_weight = scheme.sampling_rate * sum(min(w / cap, 1.0) for w in client_weights)
  expected_clients = float(scheme.clients_per_round)
  if adaptive_clipping is not None:
    adaptive_clipping = _resolve_adaptive(
      adaptive_clipping, noise_multiplier=noise, expected_clients_per_round=expected_clients
    )
  return DPParameters(
    noise_multiplier=noise,
    delta=float(delta),
    accountant=accountant,
    target_epsilon=target_epsilon,
    rounds=rounds,
    sampling=scheme,
    weight_cap=cap,
    expected_total_weight=expected_total_weight,
    expected_clients_per_round=expected_clients,
    clip_norm=_positive(clip_norm, 'clip_norm') if clip_norm is not None else None,
    adaptive_clipping=adaptive_clipping,
  )
