"""The silo's DP release of feature statistics: sensitivity, Gaussian noise, thresholding, ε.

What one silo releases for a `StatisticsQuery` is a vector of *blocks*:

    block                        L2 sensitivity of one user (add/remove)
    rows (valid rows kept)       r
    per numeric feature f:
      sum of (clip(x) - c_f)     r * h_f
      sum of (clip(x) - c_f)^2   r * h_f^2
      histogram over [min, max]  r          (all r rows in one bin is the worst case)
    per categorical feature g:
      users holding each value   sqrt(m_g)  (m_g distinct values, +1 each)

with r = `max_rows_per_user` (a user's rows beyond r are dropped, by a
deterministic hash), c_f the midpoint of [min_f, max_f], h_f half its width
(so |clip(x) - c_f| <= h_f), m_g the feature's `max_values_per_user`. Each
block is divided by its sensitivity, so each has sensitivity at most 1 and
the whole vector sqrt(B), B = 1 + 3 * numeric features + categorical
features. The silo adds N(0, (z * sqrt(B))^2) to every scaled coordinate,
i.e. noise of standard deviation `z * sqrt(B) * Δ_block` to each released
value: one Gaussian mechanism of noise multiplier z (= σ / L2 sensitivity).
Its ε is that of `dp_accounting.GaussianDpEvent(z)` composed over the
releases (RDP accountant), at the policy's δ less the thresholding δ below.

Categorical values are released only where their noisy user count exceeds
a threshold τ_g = 1 + σ_g Φ⁻¹(1 - δ_g / m_g), with δ_g = threshold_delta /
(categorical features): a value held by one user alone (count 1) passes
with probability at most δ_g / m_g, and one user adds at most m_g such
values to a feature, so the values that appear only because of that user
are released with probability at most δ_g (union bound), and over all
features at most threshold_delta. This is Gaussian partition selection
(the Gaussian sparse histogram of Wilkins, Kifer, Zhang and Karrer, 2024,
with the classical union-bound analysis): the release is (ε, δ_RDP +
threshold_delta)-DP per release, so releases x threshold_delta is taken from
the policy's δ before ε is computed. Without noise (a test mode only a lab
policy allows) τ = 1: a value is released only if two users or more hold it.

The noise is drawn from numpy's PCG64 seeded from the operating system's
entropy (`secrets`), as float64 Gaussians.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import dp_accounting
import numpy as np
from scipy import stats as scipy_stats

from fedpipe.errors import FedpipeError
from fedpipe.statistics import query as query_lib


class StatisticsReleaseError(FedpipeError, ValueError):
  """Statistics do not fit the query they are for; the message names the feature."""


@dataclasses.dataclass(frozen=True)
class NumericSums:
  """One numeric feature's sums over the kept rows (centred, clipped) and its histogram."""

  sum: float
  sum_of_squares: float
  histogram: tuple[float, ...]

  def to_json(self) -> dict[str, Any]:
    return {
      'sum': self.sum,
      'sum_of_squares': self.sum_of_squares,
      'histogram': list(self.histogram),
    }


@dataclasses.dataclass(frozen=True)
class ExactStatistics:
  """What a silo's pipeline computed from its raw data: never leaves the silo.

  Attributes:
    rows: Valid rows kept (at most `max_rows_per_user` per user).
    numeric: Feature -> its sums and histogram.
    categorical: Feature -> value -> users holding it (at most
      `max_values_per_user` values per user).
    users: Users with at least one valid row.
    rows_read: Rows read (blank lines are not rows).
    malformed: Reason -> rows that failed validation.
    rows_over_limit: Valid rows dropped by `max_rows_per_user`.
    values_over_limit: Distinct (user, feature, value) dropped by
      `max_values_per_user`.
  """

  rows: float
  numeric: Mapping[str, NumericSums]
  categorical: Mapping[str, Mapping[str, float]]
  users: int = 0
  rows_read: int = 0
  malformed: Mapping[str, int] = dataclasses.field(default_factory=dict)
  rows_over_limit: int = 0
  values_over_limit: int = 0

  def to_json(self) -> dict[str, Any]:
    return {
      'rows': self.rows,
      'numeric': {k: v.to_json() for k, v in self.numeric.items()},
      'categorical': {k: dict(sorted(v.items())) for k, v in self.categorical.items()},
      'users': self.users,
      'rows_read': self.rows_read,
      'malformed': dict(sorted(self.malformed.items())),
      'rows_over_limit': self.rows_over_limit,
      'values_over_limit': self.values_over_limit,
    }

  @property
  def data_quality(self) -> dict[str, Any]:
    """What the silo logs and audits about its input (not released)."""
    return {
      'users': self.users,
      'rows_read': self.rows_read,
      'rows_kept': int(self.rows),
      'malformed': dict(sorted(self.malformed.items())),
      'rows_over_limit': self.rows_over_limit,
      'values_over_limit': self.values_over_limit,
    }


@dataclasses.dataclass(frozen=True)
class BlockNoise:
  """The standard deviation of the noise on each value a release holds."""

  rows: float
  sum: Mapping[str, float]
  sum_of_squares: Mapping[str, float]
  histogram: Mapping[str, float]
  categorical: Mapping[str, float]
  thresholds: Mapping[str, float]


def block_sensitivities(query: query_lib.StatisticsQuery) -> dict[str, float]:
  """Each block's L2 sensitivity to one user (the module docstring's table).

  Keys: `rows`, `sum/<f>`, `sum_of_squares/<f>`, `histogram/<f>`, `categorical/<g>`.
  """
  r = float(query.max_rows_per_user)
  found = {'rows': r}
  for c in query.numeric:
    found[f'sum/{c.name}'] = r * c.half_width
    found[f'sum_of_squares/{c.name}'] = r * c.half_width**2
    found[f'histogram/{c.name}'] = r
  for c in query.categorical:
    found[f'categorical/{c.name}'] = math.sqrt(c.max_values_per_user)
  return found


def block_count(query: query_lib.StatisticsQuery) -> int:
  """B: how many blocks the release holds (its scaled L2 sensitivity is sqrt(B))."""
  return 1 + 3 * len(query.numeric) + len(query.categorical)


def noise(query: query_lib.StatisticsQuery) -> BlockNoise:
  """The noise's standard deviation on each released value, and the categorical thresholds."""
  sens = block_sensitivities(query)
  scale = query.noise_multiplier * math.sqrt(block_count(query))
  categorical = {c.name: scale * sens[f'categorical/{c.name}'] for c in query.categorical}
  per_feature_delta = query.threshold_delta / max(len(query.categorical), 1)
  thresholds = {}
  for c in query.categorical:
    sigma = categorical[c.name]
    tail = per_feature_delta / c.max_values_per_user
    thresholds[c.name] = 1.0 + (sigma * float(scipy_stats.norm.isf(tail)) if sigma > 0 else 0.0)
  return BlockNoise(
    rows=scale * sens['rows'],
    sum={c.name: scale * sens[f'sum/{c.name}'] for c in query.numeric},
    sum_of_squares={c.name: scale * sens[f'sum_of_squares/{c.name}'] for c in query.numeric},
    histogram={c.name: scale * sens[f'histogram/{c.name}'] for c in query.numeric},
    categorical=categorical,
    thresholds=thresholds,
  )


def rdp_curve(noise_multiplier: float, releases: int, orders: Sequence[float]) -> np.ndarray:
  """The RDP of `releases` Gaussian releases of noise multiplier z, at `orders` (dp-accounting)."""
  accountant = dp_accounting.rdp.RdpAccountant(orders=list(orders))
  accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), releases)
  return np.asarray(accountant.rdp, dtype=float)


def epsilon(
  noise_multiplier: float, threshold_delta: float, releases: int, *, delta: float
) -> float:
  """ε of `releases` releases at the policy's `delta` (`inf` without noise; 0 for none).

  The thresholding takes `releases * threshold_delta` of `delta`; ε is the
  Gaussian releases' (RDP accountant) at what is left.
  """
  if releases <= 0:
    return 0.0
  if noise_multiplier <= 0:
    return float('inf')
  left = delta - releases * threshold_delta
  if left <= 0:
    return float('inf')
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), releases)
  return float(accountant.get_epsilon(left))


def release(
  exact: ExactStatistics,
  query: query_lib.StatisticsQuery,
  *,
  rng: np.random.Generator | None = None,
) -> dict[str, Any]:
  """Noises `exact` as the module docstring says: the only form in which statistics leave.

  Args:
    exact: The silo's statistics for `query`.
    query: The approved query.
    rng: The noise source (default: PCG64 seeded from `secrets`).

  Returns:
    The release's JSON: `rows`, per numeric feature its noisy `sum`,
    `sum_of_squares` (centred at `center`) and `histogram`, per categorical
    feature the noisy user counts of the values that passed the threshold,
    and every noise standard deviation and threshold used.

  Raises:
    StatisticsReleaseError: If `exact` lacks a feature of `query` or a
      histogram has another number of bins.
  """
  rng = rng or np.random.default_rng(secrets.randbits(128))
  sd = noise(query)

  def noisy(value: float, sigma: float) -> float:
    return float(value + rng.normal(0.0, sigma)) if sigma > 0 else float(value)

  numeric = {}
  for c in query.numeric:
    sums = exact.numeric.get(c.name)
    if sums is None or len(sums.histogram) != c.bins:
      raise StatisticsReleaseError(
        f'the statistics of numeric feature {c.name!r} are missing or have another number of '
        f'bins than the query ({c.bins})'
      )
    numeric[c.name] = {
      'center': c.center,
      'sum': noisy(sums.sum, sd.sum[c.name]),
      'sum_of_squares': noisy(sums.sum_of_squares, sd.sum_of_squares[c.name]),
      'histogram': [noisy(v, sd.histogram[c.name]) for v in sums.histogram],
      'stddev': {
        'sum': sd.sum[c.name],
        'sum_of_squares': sd.sum_of_squares[c.name],
        'histogram': sd.histogram[c.name],
      },
    }
  categorical = {}
  for c in query.categorical:
    counts = exact.categorical.get(c.name)
    if counts is None:
      raise StatisticsReleaseError(f'the statistics of categorical feature {c.name!r} are missing')
    released = {}
    for value in sorted(counts):
      count = noisy(counts[value], sd.categorical[c.name])
      if count > sd.thresholds[c.name]:
        released[value] = count
    categorical[c.name] = {
      'counts': released,
      'stddev': sd.categorical[c.name],
      'threshold': sd.thresholds[c.name],
    }
  return {
    'rows': noisy(exact.rows, sd.rows),
    'rows_stddev': sd.rows,
    'numeric': numeric,
    'categorical': categorical,
  }
