"""The coordinator's side: combines the silos' noised statistics into federation-wide values.

Every silo releases, for the same approved query, noisy sums whose noise it
states (`mechanism.release`); noise of different silos and blocks is
independent. Over the silos S:

    n      = Σ rows_s                       var(n) = Σ σ_rows,s²
    S_f    = Σ sum_s,f    (centred at c_f)  var    = Σ σ_sum,s,f²
    Q_f    = Σ sum_of_squares_s,f           var    = Σ σ_sq,s,f²
    mean_f = c_f + S_f / n
    var_f  = Q_f / n - (S_f / n)²           std_f = sqrt(var_f)

Standard errors of mean and std come from the noise by the delta method
(first order in the noise, the data held fixed). Histograms add bin by bin
(negative noisy bins count as 0 for quantiles); clipping bounds are the
histogram's `clip_quantiles`, interpolated linearly inside a bin. A
categorical value is in the vocabulary if at least one silo released it
(its noisy count passed that silo's threshold); its count is the sum over
the silos that released it, a lower bound of the federation's count since
silos below their threshold add nothing. Vocabularies are sorted by value,
so the same released values give the same spec, whatever the noise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedpipe.errors import FedpipeError
from fedpipe.statistics import query as query_lib

DEFAULT_CLIP_QUANTILES = (0.01, 0.99)
# The smallest std written, as a fraction of a feature's half-width: a constant
# feature (or noise that makes the variance negative) still standardizes.
_MIN_STD_FRACTION = 1e-6


class CombineError(FedpipeError, ValueError):
  """The silos' releases cannot be combined (another query, no rows); the message says why."""


@dataclasses.dataclass(frozen=True)
class NumericEstimate:
  """A numeric feature's federation-wide statistics and their standard errors from the noise."""

  name: str
  rows: float
  rows_se: float
  mean: float
  mean_se: float
  std: float
  std_se: float
  histogram: tuple[float, ...]
  histogram_se: float
  bin_edges: tuple[float, ...]
  clip_low: float
  clip_high: float
  clip_quantiles: tuple[float, float]

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out['histogram'] = list(self.histogram)
    out['bin_edges'] = list(self.bin_edges)
    out['clip_quantiles'] = list(self.clip_quantiles)
    return out


@dataclasses.dataclass(frozen=True)
class CategoricalEstimate:
  """A categorical feature's vocabulary (values some silo released) and their users."""

  name: str
  vocabulary: tuple[str, ...]
  counts: Mapping[str, float]
  counts_se: Mapping[str, float]
  released_by: Mapping[str, tuple[str, ...]]

  def to_json(self) -> dict[str, Any]:
    return {
      'name': self.name,
      'vocabulary': list(self.vocabulary),
      'counts': dict(self.counts),
      'counts_se': dict(self.counts_se),
      'released_by': {k: list(v) for k, v in self.released_by.items()},
    }


@dataclasses.dataclass(frozen=True)
class FederatedStatistics:
  """What the federation's statistics say of each feature."""

  numeric: Mapping[str, NumericEstimate]
  categorical: Mapping[str, CategoricalEstimate]
  silos: tuple[str, ...]

  def to_json(self) -> dict[str, Any]:
    return {
      'silos': list(self.silos),
      'numeric': {k: v.to_json() for k, v in self.numeric.items()},
      'categorical': {k: v.to_json() for k, v in self.categorical.items()},
    }


def combine(
  query: query_lib.StatisticsQuery,
  releases: Mapping[str, Mapping[str, Any]],
  *,
  clip_quantiles: tuple[float, float] = DEFAULT_CLIP_QUANTILES,
) -> FederatedStatistics:
  """Combines each silo's release (`mechanism.release`'s JSON) of `query`.

  Args:
    query: The query every silo released.
    releases: Silo name -> its release.
    clip_quantiles: The histogram quantiles taken as clipping bounds.

  Returns:
    The combined statistics, with standard errors.

  Raises:
    CombineError: If there is no release, one lacks a feature of the query
      or has another number of bins, or the combined row count is not
      positive (no data, or noise larger than the data).
  """
  if not releases:
    raise CombineError('no silo released statistics; nothing to combine')
  lo_q, hi_q = clip_quantiles
  if not 0 <= lo_q < hi_q <= 1:
    raise CombineError(f'clip_quantiles must satisfy 0 <= low < high <= 1, got {clip_quantiles}')
  silos = tuple(sorted(releases))
  rows = sum(float(releases[s]['rows']) for s in silos)
  rows_var = sum(float(releases[s]['rows_stddev']) ** 2 for s in silos)
  if rows <= 0:
    raise CombineError(
      f'the silos released {rows:.3g} rows in all: no data to estimate from (or noise larger '
      'than the data); use more data, fewer features or less noise'
    )
  numeric = {}
  for c in query.numeric:
    parts = [_numeric_part(releases[s], c, s) for s in silos]
    total = sum(p['sum'] for p in parts)
    total_var = sum(p['stddev']['sum'] ** 2 for p in parts)
    squares = sum(p['sum_of_squares'] for p in parts)
    squares_var = sum(p['stddev']['sum_of_squares'] ** 2 for p in parts)
    histogram = np.sum([np.asarray(p['histogram'], dtype=float) for p in parts], axis=0)
    histogram_se = math.sqrt(sum(p['stddev']['histogram'] ** 2 for p in parts))
    m1 = total / rows
    variance = squares / rows - m1**2
    std_floor = c.half_width * _MIN_STD_FRACTION
    std = max(math.sqrt(max(variance, 0.0)), std_floor)
    # Delta method: gradients of mean and variance in (S, Q, n).
    mean_se = math.sqrt(total_var / rows**2 + (total / rows**2) ** 2 * rows_var)
    d_var = (-2 * total / rows**2, 1 / rows, -squares / rows**2 + 2 * total**2 / rows**3)
    var_se = math.sqrt(
      d_var[0] ** 2 * total_var + d_var[1] ** 2 * squares_var + d_var[2] ** 2 * rows_var
    )
    edges = c.bin_edges()
    numeric[c.name] = NumericEstimate(
      name=c.name,
      rows=rows,
      rows_se=math.sqrt(rows_var),
      mean=c.center + m1,
      mean_se=mean_se,
      std=std,
      std_se=var_se / (2 * std),
      histogram=tuple(float(v) for v in histogram),
      histogram_se=histogram_se,
      bin_edges=tuple(edges),
      clip_low=histogram_quantile(histogram, edges, lo_q),
      clip_high=histogram_quantile(histogram, edges, hi_q),
      clip_quantiles=(lo_q, hi_q),
    )
  categorical = {}
  for c in query.categorical:
    counts: dict[str, float] = {}
    variances: dict[str, float] = {}
    released_by: dict[str, list[str]] = {}
    for s in silos:
      part = releases[s].get('categorical', {}).get(c.name)
      if not isinstance(part, Mapping):
        raise CombineError(f'silo {s} released no statistics of categorical feature {c.name!r}')
      for value, count in part['counts'].items():
        counts[value] = counts.get(value, 0.0) + float(count)
        variances[value] = variances.get(value, 0.0) + float(part['stddev']) ** 2
        released_by.setdefault(value, []).append(s)
    vocabulary = tuple(sorted(counts))
    categorical[c.name] = CategoricalEstimate(
      name=c.name,
      vocabulary=vocabulary,
      counts={v: counts[v] for v in vocabulary},
      counts_se={v: math.sqrt(variances[v]) for v in vocabulary},
      released_by={v: tuple(released_by[v]) for v in vocabulary},
    )
  return FederatedStatistics(numeric=numeric, categorical=categorical, silos=silos)


def _numeric_part(release: Mapping[str, Any], column: query_lib.StatisticsColumn, silo: str):
  part = release.get('numeric', {}).get(column.name)
  if not isinstance(part, Mapping) or len(part.get('histogram', ())) != column.bins:
    raise CombineError(
      f'silo {silo} released no statistics of numeric feature {column.name!r}, or a histogram '
      f"of another size than the query's {column.bins} bins"
    )
  if not math.isclose(float(part['center']), column.center):
    raise CombineError(
      f"silo {silo} centred feature {column.name!r} at {part['center']}, not at the query's "
      f'{column.center}: it answered another query'
    )
  return part


def histogram_quantile(histogram: Sequence[float], edges: Sequence[float], q: float) -> float:
  """The `q` quantile of a (noisy) histogram, linear inside a bin; negative bins count as 0."""
  weights = np.clip(np.asarray(histogram, dtype=float), 0.0, None)
  total = weights.sum()
  if total <= 0:
    return float(edges[0] if q < 0.5 else edges[-1])
  target = q * total
  cumulative = 0.0
  for i, w in enumerate(weights):
    if w > 0 and cumulative + w >= target:
      return float(edges[i] + (target - cumulative) / w * (edges[i + 1] - edges[i]))
    cumulative += w
  return float(edges[-1])
