"""A statistics query: which feature statistics a coordinator asks a silo to release, on what terms.

    {"format": "fedpipe-statistics/1",
     "name": "digits feature statistics",
     "feature_spec": {...the draft feature spec, as JSON...},
     "histogram_bins": {"pixel_0_0": 16, ...},   # every numeric feature
     "max_rows_per_user": 10,
     "releases": 1,
     "privacy": {"mechanism": "gaussian_statistics", "noise_multiplier": 2.0,
                 "threshold_delta": 1e-7}}

The columns come from the feature spec: a numeric feature's statistics are
clipped to its declared `[min, max]` (so both are required here), a
categorical feature's users count once per value, each user with at most its
`max_values_per_user` values. `threshold_delta` is the δ the release of
categorical values spends (0 without categorical features, > 0 with them;
see `mechanism`). The query is what the silo's owner approves; its id is a
hash of its content, so a query with any other bound, bin count, limit or
noise is another study.

This module reads the few fields of the spec it needs itself (the layer of
the feature spec is above it); the silo's pipeline also validates the whole
spec and checks that both readings agree (`feature_statistics`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from typing import Any

from fedpipe.data import json_fields
from fedpipe.errors import FedpipeError

FORMAT = 'fedpipe-statistics/1'
MECHANISM = 'gaussian_statistics'
NUMERIC, CATEGORICAL = 'numeric', 'categorical'
FINGERPRINT_PREFIX = 'statistics:'
MAX_BINS = 1024
_WHAT = 'the statistics query'


class StatisticsQueryError(FedpipeError, ValueError):
  """A statistics query is malformed or asks for what cannot be computed; the message names the field."""


@dataclasses.dataclass(frozen=True)
class StatisticsColumn:
  """One feature whose statistics are released.

  Attributes:
    name: The raw column.
    kind: `numeric` or `categorical`.
    min: Lower clipping bound (numeric).
    max: Upper clipping bound (numeric).
    bins: Histogram bins over [min, max] (numeric).
    max_values_per_user: Distinct values one user contributes (categorical).
  """

  name: str
  kind: str
  min: float | None = None
  max: float | None = None
  bins: int | None = None
  max_values_per_user: int | None = None

  @property
  def center(self) -> float:
    """The midpoint of [min, max]: sums are of values centred here."""
    return (self.min + self.max) / 2

  @property
  def half_width(self) -> float:
    """Half of max - min: the largest |value - center| after clipping."""
    return (self.max - self.min) / 2

  def bin_edges(self) -> list[float]:
    """The `bins + 1` histogram edges over [min, max]."""
    width = (self.max - self.min) / self.bins
    return [self.min + i * width for i in range(self.bins)] + [self.max]


@dataclasses.dataclass(frozen=True)
class StatisticsQuery:
  """What statistics a silo computes and releases (see the module docstring)."""

  name: str
  feature_spec: dict[str, Any]
  histogram_bins: dict[str, int]
  max_rows_per_user: int
  noise_multiplier: float
  threshold_delta: float
  releases: int = 1

  def __post_init__(self):
    object.__setattr__(self, 'columns', _columns(self.feature_spec, self.histogram_bins))
    if isinstance(self.max_rows_per_user, bool) or not isinstance(self.max_rows_per_user, int):
      raise StatisticsQueryError(f'{_WHAT} field max_rows_per_user must be a whole number')
    if self.max_rows_per_user < 1:
      raise StatisticsQueryError(
        f'{_WHAT} field max_rows_per_user must be >= 1, got {self.max_rows_per_user}'
      )
    if isinstance(self.releases, bool) or not isinstance(self.releases, int) or self.releases < 1:
      raise StatisticsQueryError(f'{_WHAT} field releases must be a whole number >= 1')
    z = self.noise_multiplier
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not math.isfinite(z) or z < 0:
      raise StatisticsQueryError(
        f'{_WHAT} field privacy.noise_multiplier must be a finite number >= 0, got {z!r}'
      )
    t = self.threshold_delta
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < 1:
      raise StatisticsQueryError(
        f'{_WHAT} field privacy.threshold_delta must be a number in [0, 1), got {t!r}'
      )
    has_categorical = any(c.kind == CATEGORICAL for c in self.columns)
    if has_categorical and t == 0:
      raise StatisticsQueryError(
        f'{_WHAT} has categorical features, so privacy.threshold_delta must be > 0: it is the '
        'delta of releasing only the values whose noisy count passes the threshold (e.g. 1e-7)'
      )
    if not has_categorical and t != 0:
      raise StatisticsQueryError(
        f'{_WHAT} has no categorical features; set privacy.threshold_delta to 0 (it would '
        'spend delta on nothing)'
      )

  columns: tuple[StatisticsColumn, ...] = dataclasses.field(init=False, compare=False)

  @property
  def numeric(self) -> tuple[StatisticsColumn, ...]:
    return tuple(c for c in self.columns if c.kind == NUMERIC)

  @property
  def categorical(self) -> tuple[StatisticsColumn, ...]:
    return tuple(c for c in self.columns if c.kind == CATEGORICAL)

  @property
  def privacy(self) -> dict[str, Any]:
    """The privacy section the silo's ledger composes (`privacy_ledger`)."""
    return {
      'mechanism': MECHANISM,
      'noise_multiplier': float(self.noise_multiplier),
      'threshold_delta': float(self.threshold_delta),
    }

  def to_json(self) -> dict[str, Any]:
    return {
      'format': FORMAT,
      'name': self.name,
      'feature_spec': copy.deepcopy(self.feature_spec),
      'histogram_bins': dict(sorted(self.histogram_bins.items())),
      'max_rows_per_user': self.max_rows_per_user,
      'releases': self.releases,
      'privacy': self.privacy,
    }

  @property
  def study_id(self) -> str:
    """A hash of the whole query: any other bound, limit or noise is another study."""
    return self.fingerprint.removeprefix(FINGERPRINT_PREFIX)[:16]

  @property
  def fingerprint(self) -> str:
    """What the silo's governance state records as the study's one 'computation'.

    Prefixed, so it can never equal a TFF computation's fingerprint.
    """
    canonical = json.dumps(self.to_json(), sort_keys=True, separators=(',', ':'))
    return FINGERPRINT_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()

  def differences(self, other: StatisticsQuery) -> list[str]:
    """Each term in which `other` differs from this query, naming both values."""
    found = []
    mine, theirs = {c.name: c for c in self.columns}, {c.name: c for c in other.columns}
    for name in sorted(set(mine) | set(theirs)):
      a, b = mine.get(name), theirs.get(name)
      if a is None or b is None:
        found.append(f'feature {name!r} is {"only in the sent query" if a is None else "missing"}')
      elif a != b:
        for key in ('kind', 'min', 'max', 'bins', 'max_values_per_user'):
          if getattr(a, key) != getattr(b, key):
            found.append(
              f'feature {name!r} {key}: sent {getattr(b, key)}, approved {getattr(a, key)}'
            )
    for key in ('max_rows_per_user', 'noise_multiplier', 'threshold_delta', 'releases', 'name'):
      if getattr(self, key) != getattr(other, key):
        found.append(f'{key}: sent {getattr(other, key)!r}, approved {getattr(self, key)!r}')
    if not found and self.feature_spec != other.feature_spec:
      found.append('the feature spec (client key, label or feature order) differs')
    return found

  @classmethod
  def from_json(cls, data: Any) -> StatisticsQuery:
    """Parses a query sent by another party.

    Raises:
      StatisticsQueryError: Naming the field that is missing or malformed.
    """
    data = json_fields.require_object(data, _WHAT, StatisticsQueryError)
    if data.get('format') != FORMAT:
      raise StatisticsQueryError(
        f'unknown statistics query format {data.get("format")!r}; expected {FORMAT}'
      )
    privacy = _field(data, 'privacy', dict)
    if privacy.get('mechanism') != MECHANISM:
      raise StatisticsQueryError(
        f'{_WHAT} field privacy.mechanism must be {MECHANISM!r}, got {privacy.get("mechanism")!r}'
      )
    bins = _field(data, 'histogram_bins', dict)
    return cls(
      name=_field(data, 'name', str),
      feature_spec=_field(data, 'feature_spec', dict),
      histogram_bins=bins,
      max_rows_per_user=_field(data, 'max_rows_per_user', int),
      releases=_field(data, 'releases', int),
      noise_multiplier=_number(privacy, 'noise_multiplier'),
      threshold_delta=_number(privacy, 'threshold_delta'),
    )


def is_statistics_request(request: Any) -> bool:
  """Whether a stored study request (its JSON) is a statistics query."""
  return isinstance(request, dict) and request.get('format') == FORMAT


def _field(data: dict[str, Any], key: str, kind: type, *, within: str = '') -> Any:
  return json_fields.field(data, key, kind, what=_WHAT, error=StatisticsQueryError, within=within)


def _number(data: dict[str, Any], key: str) -> float:
  value = _field(data, key, object, within='privacy')
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise StatisticsQueryError(f'{_WHAT} field privacy.{key} must be a number, got {value!r}')
  return float(value)


def _columns(spec: Any, bins: Any) -> tuple[StatisticsColumn, ...]:
  """The statistics columns of a feature spec's JSON, with their histogram bins."""
  if not isinstance(spec, dict) or not isinstance(spec.get('features'), list):
    raise StatisticsQueryError(f'{_WHAT} field feature_spec must be a feature spec with features')
  if not isinstance(bins, dict):
    raise StatisticsQueryError(f'{_WHAT} field histogram_bins must map numeric features to bins')
  columns, names = [], set()
  for i, feature in enumerate(spec['features']):
    where = f'feature_spec.features[{i}]'
    if not isinstance(feature, dict) or not isinstance(feature.get('name'), str):
      raise StatisticsQueryError(f'{_WHAT} field {where} must be an object with a name')
    name = feature['name']
    if name in names:
      raise StatisticsQueryError(f'{_WHAT} field {where}: feature {name!r} is listed twice')
    names.add(name)
    kind = feature.get('type', NUMERIC)
    if kind == NUMERIC:
      low, high = feature.get('min'), feature.get('max')
      if not all(_finite(v) for v in (low, high)) or not low < high:
        raise StatisticsQueryError(
          f'numeric feature {name!r} ({where}) needs both bounds, min < max, for statistics '
          f'(got min={low!r}, max={high!r}): values are clipped to them and the noise is '
          'scaled to them; add "min" and "max" to the feature spec'
        )
      n = bins.get(name)
      if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_BINS:
        raise StatisticsQueryError(
          f'{_WHAT} field histogram_bins.{name} must be a whole number in [1, {MAX_BINS}], '
          f'got {n!r}'
        )
      columns.append(StatisticsColumn(name, NUMERIC, float(low), float(high), bins=n))
    elif kind == CATEGORICAL:
      m = feature.get('max_values_per_user', 1)
      if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise StatisticsQueryError(
          f'categorical feature {name!r} ({where}) field max_values_per_user must be a whole '
          f'number >= 1, got {m!r}'
        )
      columns.append(StatisticsColumn(name, CATEGORICAL, max_values_per_user=m))
    else:
      raise StatisticsQueryError(
        f'feature {name!r} ({where}) has type {kind!r}; expected {NUMERIC!r} or {CATEGORICAL!r}'
      )
  if not columns:
    raise StatisticsQueryError(f'{_WHAT} feature spec lists no features')
  extra = sorted(set(bins) - {c.name for c in columns if c.kind == NUMERIC})
  if extra:
    raise StatisticsQueryError(
      f'{_WHAT} field histogram_bins names {extra}, which are not numeric features of the spec'
    )
  return tuple(columns)


def _finite(value: Any) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
