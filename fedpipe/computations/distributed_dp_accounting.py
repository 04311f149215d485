"""(ε, δ) of distributed discrete Gaussian noise under secure aggregation.

Each of n silos scales its partial sum of users' clipped updates (each
user's summand has L2 norm <= `l2_clip` in the float domain) by `scale`,
rounds every coordinate stochastically to an integer, and adds its own share
of discrete Gaussian noise N_Z(0, local_stddev^2) per coordinate; secure
aggregation reveals only the sum. Up to t silos may collude with the
coordinator, which then knows their shares, so only the n - t honest shares
protect a user: local_stddev^2 = total_stddev^2 / (n - t).

dp-accounting (0.4.3) has no DpEvent for this mechanism, so its RDP curve is
computed here: Kairouz, Liu and Steinke (ICML 2021), Proposition 14, for one
release; Zhu and Wang (ICML 2019), Theorem 8, for Poisson sampling of users
(see `SYMMETRIC_PAIRS_ARGUMENT` for why it applies); rounds compose by adding
RDP curves; `dp_accounting.rdp.compute_epsilon` converts the result to
(ε, δ). Users are neighbours by add/remove-one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import dp_accounting
import numpy as np
from scipy import special

from fedpipe.errors import FedpipeError

# Integer orders only: the subsampling bounds are stated for integer orders.
RDP_ORDERS = tuple(range(2, 129)) + (160, 192, 256)

SYMMETRIC_PAIRS_ARGUMENT = """\
Why Zhu and Wang's Theorem 8 (the tight bound) applies to this mechanism.

Theorem 8 of Zhu and Wang (ICML 2019) gives the Poisson-subsampled RDP at an
integer order alpha as exactly the binomial expansion (their Theorem 6's
lower bound, without Theorem 5's factor 3 on the terms l >= 3) for any
mechanism whose output distributions P, Q on every pair of neighbouring
inputs have non-negative odd-order Pearson-Vajda pseudo-divergences:
E_Q[(P/Q - 1)^l] >= 0 for odd l = 3..alpha, in both orders of the pair.

Stochastic rounding of y is distributed as floor(y + U), U uniform on [0, 1)
and independent of the data and of the sampling; fix U (the colluding silos'
rounding and noise are then known constants too). The honest silos' noise N
is a sum of independent discrete Gaussians: symmetric on Z^d. Two
neighbouring inputs then give P = law(a + N) and Q = law(a + v + N) with v
an integer vector, ||v||_2 <= l2_sensitivity. The reflection T(z) = 2a + v - z
maps Z^d onto itself, P onto Q and Q onto P, so the likelihood ratio
L = Q/P has L(Tz) = 1/L(z). Pairing each z where L < 1 with Tz where L > 1:
E_P[(L - 1)^l] = sum over {L > 1} of P(z) (L - 1)^l (1 - L^(1-l)) >= 0 for
odd l, and likewise with P and Q swapped. So Theorem 8 holds for each fixed
U; exp((alpha - 1) D_alpha) is jointly convex, so the bound holds for the
mixture over U, the real mechanism. Proposition 14 bounds D_alpha(Q||P) and
D_alpha(P||Q) for every such v, and the expansion grows with each eps(l), so
it may be plugged in.

(The argument is this module's, not a quotation; the Gaussian, whose pairs
are symmetric the same way, is the case Mironov, Talwar and Zhang (2019)
computed, and the tests check the expansion against dp-accounting's exact
sampled Gaussian and against exactly computed sums of discrete Gaussians.)
"""


class DistributedDPAccountingError(FedpipeError, ValueError):
  """The distributed discrete Gaussian cannot be accounted for as given."""


def _is_int(value) -> bool:
  return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_positive(name: str, value: float) -> None:
  if not (isinstance(value, int | float | np.number) and math.isfinite(value) and value > 0):
    raise DistributedDPAccountingError(f'{name} must be a finite number > 0, got {value!r}')


def _check_nonnegative(name: str, value: float) -> None:
  if not (isinstance(value, int | float | np.number) and math.isfinite(value) and value >= 0):
    raise DistributedDPAccountingError(f'{name} must be a finite number >= 0, got {value!r}')


def _check_int_at_least(name: str, value: int, minimum: int) -> None:
  if not (_is_int(value) and value >= minimum):
    raise DistributedDPAccountingError(f'{name} must be an integer >= {minimum}, got {value!r}')


def _check_sampling_rate(sampling_rate: float) -> None:
  if not (isinstance(sampling_rate, int | float | np.number) and 0 < sampling_rate <= 1):
    raise DistributedDPAccountingError(f'sampling_rate must be in (0, 1], got {sampling_rate!r}')


def _check_rounds_and_delta(rounds: int, delta: float) -> None:
  if not (isinstance(delta, float | int | np.number) and 0 < delta < 1):
    raise DistributedDPAccountingError(f'delta must be in (0, 1), got {delta!r}')
  _check_int_at_least('rounds', rounds, 0)


def _orders_array(orders: Sequence[float], *, integer: bool) -> np.ndarray:
  """`orders` as a float array, each checked to be > 1 (and integral if `integer`)."""
  array = np.asarray(orders, dtype=np.float64).reshape(-1)
  if array.size == 0:
    raise DistributedDPAccountingError('orders must not be empty')
  if not np.all(np.isfinite(array)) or np.any(array <= 1):
    raise DistributedDPAccountingError(f'orders must be finite and > 1, got {list(orders)}')
  if integer and (np.any(array < 2) or np.any(array != np.floor(array))):
    raise DistributedDPAccountingError(
      f'orders must be integers >= 2 (the subsampling bound needs integer orders), '
      f'got {list(orders)}'
    )
  return array


def rounded_sensitivity(l2_clip: float, scale: float, dim: int) -> tuple[float, float]:
  """(L2, L1) sensitivity, in integer units, of one user's scaled and rounded update.

  L2: the update's norm is at most `l2_clip * scale` after scaling, and
  stochastic rounding moves each of the `dim` coordinates by less than 1, so
  the rounding error has norm < sqrt(dim); by the triangle inequality the
  rounded update has norm <= l2_clip * scale + sqrt(dim).

  L1: any vector has ||x||_1 <= sqrt(dim) * ||x||_2 (Cauchy-Schwarz); an
  integer vector also has |x_i| <= x_i^2 for every coordinate, so
  ||x||_1 <= ||x||_2^2. The bound is the smaller of the two. (With the L2
  bound above, L2 > sqrt(dim), so sqrt(dim) * L2 is the smaller; the second
  would matter only under a tighter L2 bound.)

  Args:
    l2_clip: Clip norm C of a user's update in the float domain (> 0).
    scale: Factor applied before rounding (> 0).
    dim: Number of coordinates (integer >= 1).

  Returns:
    (L2 sensitivity, L1 sensitivity).

  Raises:
    DistributedDPAccountingError: If an argument is out of range.
  """
  _check_positive('l2_clip', l2_clip)
  _check_positive('scale', scale)
  _check_int_at_least('dim', dim, 1)
  l2 = l2_clip * scale + math.sqrt(dim)
  l1 = min(math.sqrt(dim) * l2, l2**2)
  return float(l2), float(l1)


def discrete_gaussian_sum_rdp(
  orders: Sequence[float],
  *,
  l2_sensitivity: float,
  l1_sensitivity: float,
  local_stddev: float,
  num_shares: int,
  dim: int,
) -> np.ndarray:
  """RDP of releasing x + the sum of `num_shares` independent N_Z(0, local_stddev^2)^dim.

  Kairouz, Liu and Steinke, "The Distributed Discrete Gaussian Mechanism for
  Federated Learning with Secure Aggregation", ICML 2021 (arXiv 2102.06387),
  Proposition 14, Eq. 17. With sigma^2 = num_shares * local_stddev^2,
  l2 = l2_sensitivity / sigma, l1 = l1_sensitivity / sigma and
  tau = 10 * sum_{k=1}^{num_shares-1} exp(-2 pi^2 local_stddev^2 k / (k + 1)),
  the RDP at order alpha is the least of
    alpha/2 * l2^2 + tau * dim,
    alpha/2 * (l2^2 + 2 * l1 * tau + tau^2 * dim),
    alpha/2 * (l2 + sqrt(dim) * tau)^2.
  One share (tau = 0) is the discrete Gaussian, alpha * l2^2 / 2, the same as
  the continuous Gaussian.

  Args:
    orders: RDP orders (> 1).
    l2_sensitivity: L2 sensitivity of x, in the noise's (integer) units (>= 0).
    l1_sensitivity: L1 sensitivity of x, likewise (>= 0).
    local_stddev: The stddev parameter of each share (> 0).
    num_shares: Number of shares summed (integer >= 1).
    dim: Dimension of x (integer >= 1).

  Returns:
    The RDP at each order.

  Raises:
    DistributedDPAccountingError: If an argument is out of range.
  """
  alphas = _orders_array(orders, integer=False)
  _check_nonnegative('l2_sensitivity', l2_sensitivity)
  _check_nonnegative('l1_sensitivity', l1_sensitivity)
  _check_positive('local_stddev', local_stddev)
  _check_int_at_least('num_shares', num_shares, 1)
  _check_int_at_least('dim', dim, 1)
  sigma = math.sqrt(num_shares) * local_stddev
  l2 = l2_sensitivity / sigma
  l1 = l1_sensitivity / sigma
  k = np.arange(1, num_shares, dtype=np.float64)
  tau = 10.0 * float(np.sum(np.exp(-2.0 * math.pi**2 * local_stddev**2 * k / (k + 1))))
  half = alphas / 2.0
  return np.minimum.reduce(
    [
      half * l2**2 + tau * dim,
      half * (l2**2 + 2.0 * l1 * tau + tau**2 * dim),
      half * (l2 + math.sqrt(dim) * tau) ** 2,
    ]
  )


def poisson_subsampled_rdp(
  orders: Sequence[int],
  sampling_rate: float,
  rdp_of_order: Callable[[int], float],
  *,
  symmetric_pairs: bool = False,
) -> np.ndarray:
  """RDP at each order of a mechanism run on a Poisson sample of rate `sampling_rate`.

  Zhu and Wang, "Poisson Subsampled Rényi Differential Privacy", ICML 2019
  (PMLR 97). For integer alpha >= 2, rate gamma and the mechanism's RDP
  curve eps:
    eps'(alpha) <= 1/(alpha-1) * log((1-gamma)^(alpha-1) * (alpha*gamma - gamma + 1)
      + C(alpha,2) * gamma^2 * (1-gamma)^(alpha-2) * exp(eps(2))
      + k * sum_{l=3}^{alpha} C(alpha,l) * (1-gamma)^(alpha-l) * gamma^l * exp((l-1) * eps(l))),
  with k = 3 for any mechanism (Theorem 5, the general upper bound) and k = 1
  (Theorem 8, tight) for a mechanism whose neighbouring output pairs have
  non-negative odd-order Pearson-Vajda pseudo-divergences, which symmetric
  pairs have (`SYMMETRIC_PAIRS_ARGUMENT`). Computed in log space so that
  large orders do not overflow. Sampling cannot hurt, so the result at each
  order is min(bound, eps(alpha)).

  Args:
    orders: Integer RDP orders (>= 2).
    sampling_rate: Probability gamma that each user takes part (in (0, 1]).
    rdp_of_order: eps: the unsampled mechanism's RDP at an integer order >= 2.
    symmetric_pairs: The mechanism's neighbouring output pairs are mirror
      images (as a shift of symmetric lattice noise's are): Theorem 8 applies.

  Returns:
    The RDP of the sampled mechanism at each order.

  Raises:
    DistributedDPAccountingError: If an order is not an integer >= 2 or the
      rate is out of range.
  """
  alphas = _orders_array(orders, integer=True).astype(np.int64)
  _check_sampling_rate(sampling_rate)
  max_order = int(alphas.max())
  # eps[l] for l = 0 .. max_order; only l >= 2 is used.
  eps = np.full(max_order + 1, np.nan)
  for order in range(2, max_order + 1):
    eps[order] = float(rdp_of_order(order))
  unsampled = eps[alphas]
  if sampling_rate == 1:
    return unsampled
  gamma = float(sampling_rate)
  log_gamma = math.log(gamma)
  log_1m_gamma = math.log1p(-gamma)
  result = np.empty(len(alphas))
  for i, alpha in enumerate(alphas):
    ells = np.arange(2, alpha + 1)
    log_binom = (
      special.gammaln(alpha + 1) - special.gammaln(ells + 1) - special.gammaln(alpha - ells + 1)
    )
    log_terms = (
      log_binom + (alpha - ells) * log_1m_gamma + ells * log_gamma + (ells - 1) * eps[ells]
    )
    if not symmetric_pairs:
      log_terms[1:] += math.log(3.0)  # l >= 3 carries the factor 3; l = 2 does not.
    first = (alpha - 1) * log_1m_gamma + math.log1p((alpha - 1) * gamma)
    bound = special.logsumexp(np.concatenate([[first], log_terms])) / (alpha - 1)
    result[i] = min(bound, unsampled[i])
  return result


@dataclasses.dataclass(frozen=True)
class DistributedDiscreteGaussian:
  """One round's secure sum of scaled, rounded updates plus distributed discrete Gaussian noise.

  Attributes:
    l2_clip: Clip norm C of a user's update in the float domain.
    scale: Factor applied to the update before stochastic rounding.
    dim: Number of coordinates.
    total_stddev: Stddev, in integer units, of the sum of the honest silos'
      noise shares (0 means no noise: ε is infinite).
    num_silos: n, the silos that each add a share.
    max_colluding: t, the silos that may collude with the coordinator (0 <= t < n).
  """

  l2_clip: float
  scale: float
  dim: int
  total_stddev: float
  num_silos: int
  max_colluding: int

  def __post_init__(self):
    _check_positive('l2_clip', self.l2_clip)
    _check_positive('scale', self.scale)
    _check_int_at_least('dim', self.dim, 1)
    _check_nonnegative('total_stddev', self.total_stddev)
    _check_int_at_least('num_silos', self.num_silos, 1)
    _check_int_at_least('max_colluding', self.max_colluding, 0)
    if self.max_colluding >= self.num_silos:
      raise DistributedDPAccountingError(
        f'max_colluding must be < num_silos={self.num_silos} (at least one honest silo), '
        f'got {self.max_colluding}'
      )

  @property
  def honest_shares(self) -> int:
    """n - t: the noise shares the adversary does not know."""
    return self.num_silos - self.max_colluding

  @property
  def local_stddev(self) -> float:
    """Each silo's share: total_stddev / sqrt(n - t)."""
    return self.total_stddev / math.sqrt(self.honest_shares)

  @property
  def noise_multiplier_equivalent(self) -> float:
    """total_stddev / (l2_clip * scale): the continuous Gaussian's noise multiplier at equal noise."""
    return self.total_stddev / (self.l2_clip * self.scale)

  def round_rdp(self, orders: Sequence[int], sampling_rate: float) -> np.ndarray:
    """RDP of one round at each integer order, users Poisson-sampled at `sampling_rate`.

    Proposition 14 for the release, Zhu-Wang Theorem 8 for the sampling
    (`SYMMETRIC_PAIRS_ARGUMENT`).

    Raises:
      DistributedDPAccountingError: If an order or the rate is out of range.
    """
    _orders_array(orders, integer=True)
    _check_sampling_rate(sampling_rate)
    if self.total_stddev == 0:
      return np.full(len(orders), np.inf)
    l2, l1 = rounded_sensitivity(self.l2_clip, self.scale, self.dim)
    max_order = int(max(orders))
    curve = discrete_gaussian_sum_rdp(
      range(2, max_order + 1),
      l2_sensitivity=l2,
      l1_sensitivity=l1,
      local_stddev=self.local_stddev,
      num_shares=self.honest_shares,
      dim=self.dim,
    )
    return poisson_subsampled_rdp(
      orders, sampling_rate, lambda order: curve[order - 2], symmetric_pairs=True
    )


@functools.lru_cache(maxsize=32)
def _round_rdp_at_default_orders(
  mechanism: DistributedDiscreteGaussian, sampling_rate: float
) -> np.ndarray:
  """One round's RDP at RDP_ORDERS, cached (ε is asked after every round); read-only."""
  rdp = mechanism.round_rdp(RDP_ORDERS, sampling_rate)
  rdp.flags.writeable = False
  return rdp


def compute_epsilon(
  mechanism: DistributedDiscreteGaussian, *, sampling_rate: float, rounds: int, delta: float
) -> float:
  """ε after `rounds` rounds at `delta`; 0 for 0 rounds; `inf` without noise.

  Rounds compose by adding RDP curves (rounds x one round's RDP at
  RDP_ORDERS); dp-accounting converts the curve to ε.

  Raises:
    DistributedDPAccountingError: If a parameter is out of range.
  """
  if not isinstance(mechanism, DistributedDiscreteGaussian):
    raise DistributedDPAccountingError(
      f'mechanism must be a DistributedDiscreteGaussian, got {type(mechanism).__name__}'
    )
  _check_sampling_rate(sampling_rate)
  _check_rounds_and_delta(rounds, delta)
  if rounds == 0:
    return 0.0
  if mechanism.total_stddev == 0:
    return float('inf')
  one_round = _round_rdp_at_default_orders(mechanism, float(sampling_rate))
  return float(dp_accounting.rdp.compute_epsilon(RDP_ORDERS, rounds * one_round, delta)[0])


def gaussian_epsilon_at_integer_orders(
  noise_multiplier: float, sampling_rate: float, rounds: int, delta: float
) -> float:
  """ε of the Poisson-sampled continuous Gaussian, by dp-accounting's RDP accountant at RDP_ORDERS.

  The same orders and conversion as `compute_epsilon`, so the two mechanisms
  can be set side by side; 0 for 0 rounds, `inf` without noise.

  Raises:
    DistributedDPAccountingError: If a parameter is out of range.
  """
  _check_nonnegative('noise_multiplier', noise_multiplier)
  _check_sampling_rate(sampling_rate)
  _check_rounds_and_delta(rounds, delta)
  if rounds == 0:
    return 0.0
  if noise_multiplier == 0:
    return float('inf')
  accountant = dp_accounting.rdp.RdpAccountant(orders=list(RDP_ORDERS))
  event = dp_accounting.PoissonSampledDpEvent(
    sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
  )
  accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
  return float(accountant.get_epsilon(delta))
