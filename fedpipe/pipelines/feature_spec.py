"""The feature spec: which raw columns make a client's examples, and how.

A feature spec is a small JSON file the data owner writes next to the raw
data:

    {"schema_version": 1,
     "client_key": "client_id",
     "label": {"name": "label", "num_classes": 10},
     "features": [{"name": "pixel_0_0", "min": 0.0, "max": 16.0}, ...]}

Each feature may carry `min`/`max` (validation bounds: a value outside them
makes its record malformed) and `mean`/`std` (standardization). A value is
written as `(v - mean) / std` if mean/std are given, else as
`(v - min) / (max - min)` if both bounds are given, else as read.

`FeatureSpec.parse_record` turns one raw record into `(client_key, x, y)` or
raises `MalformedRecordError` with a stable reason code (see `REASONS`); the
preprocessing pipeline sends such records to its dead letter.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fedpipe.errors import FedpipeError

SCHEMA_VERSION = 1

# Reason codes of malformed records. They are stable: dashboards and the
# manifest's dead-letter counts use them.
MISSING_FIELD = 'missing_field'  # A spec column is absent from the record.
MISSING_VALUE = 'missing_value'  # A feature or label is present but empty/null.
NOT_A_NUMBER = 'not_a_number'  # A feature value does not parse as a number.
NON_FINITE = 'non_finite'  # A feature value is NaN or infinite.
OUT_OF_RANGE = 'out_of_range'  # A feature value is outside its [min, max].
BAD_LABEL = 'bad_label'  # The label is not an integer in [0, num_classes).
EMPTY_CLIENT_KEY = 'empty_client_key'  # The client key is empty.
BAD_JSON = 'bad_json'  # A JSONL line is not a JSON object.
WRONG_COLUMN_COUNT = 'wrong_column_count'  # A CSV row's length != header's.
BAD_ENCODING = 'bad_encoding'  # A line is not valid UTF-8.
BAD_CSV = 'bad_csv'  # A CSV record the csv module rejects (e.g. an over-long field).
REASONS = (
  MISSING_FIELD,
  MISSING_VALUE,
  NOT_A_NUMBER,
  NON_FINITE,
  OUT_OF_RANGE,
  BAD_LABEL,
  EMPTY_CLIENT_KEY,
  BAD_JSON,
  WRONG_COLUMN_COUNT,
  BAD_ENCODING,
  BAD_CSV,
)

_FEATURE_KEYS = frozenset({'name', 'min', 'max', 'mean', 'std'})
_LABEL_KEYS = frozenset({'name', 'num_classes'})
_TOP_KEYS = frozenset({'schema_version', 'client_key', 'label', 'features'})


class FeatureSpecError(FedpipeError, ValueError):
  """A feature spec is unreadable or invalid, or does not match the input data."""


class MalformedRecordError(FedpipeError, ValueError):
  """A raw record does not satisfy the feature spec.

  Attributes:
    reason: One of `REASONS`, a short stable code.
    detail: A human-readable explanation naming the column and value.
  """

  def __init__(self, reason: str, detail: str):
    super().__init__(f'{reason}: {detail}')
    self.reason = reason
    self.detail = detail

  def __reduce__(self):
    return (type(self), (self.reason, self.detail))


@dataclasses.dataclass(frozen=True)
class FeatureColumn:
  """One numeric input column.

  Attributes:
    name: The column name in the raw data.
    min: Smallest valid value, or None for no lower bound.
    max: Largest valid value, or None for no upper bound.
    mean: Standardization mean (with `std`), or None.
    std: Standardization standard deviation (> 0, with `mean`), or None.
  """

  name: str
  min: float | None = None
  max: float | None = None
  mean: float | None = None
  std: float | None = None

  def normalize(self, value: float) -> float:
    """Returns `value` standardized, min-max scaled, or as is (see module doc)."""
    if self.mean is not None and self.std is not None:
      return (value - self.mean) / self.std
    if self.min is not None and self.max is not None:
      return (value - self.min) / (self.max - self.min)
    return value

  def to_json(self) -> dict[str, Any]:
    out: dict[str, Any] = {'name': self.name}
    for key in ('min', 'max', 'mean', 'std'):
      if getattr(self, key) is not None:
        out[key] = getattr(self, key)
    return out


@dataclasses.dataclass(frozen=True)
class LabelSpec:
  """The class-label column: integers in [0, num_classes)."""

  name: str
  num_classes: int


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """Which raw columns make an example, how to validate and normalize them.

  Attributes:
    client_key: The column holding the client key.
    label: The label column.
    features: The feature columns, in the order of the written `x` vector.
  """

  client_key: str
  label: LabelSpec
  features: tuple[FeatureColumn, ...]

  def __post_init__(self):
    object.__setattr__(self, 'features', tuple(self.features))
    _check_spec(self.client_key, self.label, self.features, source='feature spec')

  @property
  def num_features(self) -> int:
    return len(self.features)

  @property
  def num_classes(self) -> int:
    return self.label.num_classes

  @property
  def columns(self) -> tuple[str, ...]:
    """All columns a record needs: client key, label, then the features."""
    return (self.client_key, self.label.name) + tuple(f.name for f in self.features)

  def to_json(self) -> dict[str, Any]:
    return {
      'schema_version': SCHEMA_VERSION,
      'client_key': self.client_key,
      'label': {'name': self.label.name, 'num_classes': self.label.num_classes},
      'features': [f.to_json() for f in self.features],
    }

  @classmethod
  def from_json(cls, data: Any, *, source: str = 'feature spec') -> FeatureSpec:
    """Builds a spec from its JSON form.

    Args:
      data: The parsed JSON object.
      source: Where it came from (a file name), for error messages.

    Returns:
      The spec.

    Raises:
      FeatureSpecError: If a field is missing, unknown, of the wrong type or
        value; the message names `source` and the field.
    """
    if not isinstance(data, Mapping):
      raise FeatureSpecError(f'{source}: expected a JSON object, got {type(data).__name__}.')
    _check_keys(data, _TOP_KEYS, source, 'the top level')
    version = _field(data, 'schema_version', source)
    if version != SCHEMA_VERSION:
      raise FeatureSpecError(
        f'{source}: schema_version {version!r} is not supported (expected '
        f'{SCHEMA_VERSION}); rewrite the spec in version {SCHEMA_VERSION} format.'
      )
    client_key = _field(data, 'client_key', source)
    label = _field(data, 'label', source)
    if not isinstance(label, Mapping):
      raise FeatureSpecError(
        f'{source}: field "label" must be an object with "name" and "num_classes".'
      )
    _check_keys(label, _LABEL_KEYS, source, 'field "label"')
    num_classes = _field(label, 'num_classes', source, prefix='label.')
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
      raise FeatureSpecError(
        f'{source}: field "label.num_classes" must be an integer, got {num_classes!r}.'
      )
    features_json = _field(data, 'features', source)
    if not isinstance(features_json, list):
      raise FeatureSpecError(f'{source}: field "features" must be a list of objects.')
    features = []
    for i, feature in enumerate(features_json):
      where = f'features[{i}]'
      if not isinstance(feature, Mapping):
        raise FeatureSpecError(f'{source}: field "{where}" must be an object, got {feature!r}.')
      _check_keys(feature, _FEATURE_KEYS, source, f'field "{where}"')
      name = _field(feature, 'name', source, prefix=f'{where}.')
      bounds = {}
      for key in ('min', 'max', 'mean', 'std'):
        value = feature.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
          raise FeatureSpecError(
            f'{source}: field "{where}.{key}" of feature {name!r} must be a number, got {value!r}.'
          )
        bounds[key] = None if value is None else float(value)
      features.append(FeatureColumn(name=name, **bounds))
    label_spec = LabelSpec(
      name=_field(label, 'name', source, prefix='label.'), num_classes=num_classes
    )
    _check_spec(client_key, label_spec, features, source=source)
    return cls(client_key=client_key, label=label_spec, features=tuple(features))

  @classmethod
  def load(cls, path: str) -> FeatureSpec:
    """Reads a spec from a JSON file (a local path or a Beam filesystem URL).

    Raises:
      FeatureSpecError: If the file cannot be read, is not JSON, or is not a
        valid spec; the message names the file (and the field).
    """
    try:
      text = _read_text(path)
    except (OSError, UnicodeDecodeError) as e:
      raise FeatureSpecError(
        f'cannot read feature spec {path!r} ({type(e).__name__}: {e}); set '
        'data.feature_spec to an existing JSON file, or run '
        'fedpipe-make-data to write the bundled one.'
      ) from e
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise FeatureSpecError(f'feature spec {path!r} is not valid JSON: {e}.') from e
    return cls.from_json(data, source=path)

  def save(self, path: str) -> None:
    """Writes the spec as JSON to a local path."""
    with open(path, 'w', encoding='utf-8') as f:
      json.dump(self.to_json(), f, indent=2)
      f.write('\n')

  def check_columns(self, columns: Iterable[str], *, source: str) -> None:
    """Checks that an input's columns include every column of the spec.

    Args:
      columns: The column names of the input (its CSV header).
      source: The input's name (a file path), for the error message.

    Raises:
      FeatureSpecError: Naming the missing (or repeated) columns and `source`.
    """
    columns = list(columns)
    present = set(columns)
    missing = [c for c in self.columns if c not in present]
    if missing:
      shown = ', '.join(repr(c) for c in missing[:10])
      more = f' and {len(missing) - 10} more' if len(missing) > 10 else ''
      raise FeatureSpecError(
        f'{source}: header lacks {len(missing)} column(s) of the feature spec: '
        f'{shown}{more}; fix the header or the spec (data.feature_spec).'
      )
    repeated = sorted({c for c in self.columns if columns.count(c) > 1})
    if repeated:
      raise FeatureSpecError(
        f'{source}: header repeats column(s) {repeated} of the feature spec; '
        'make the header names unique.'
      )

  def parse_record(self, record: Mapping[str, Any]) -> tuple[str, list[float], int]:
    """Validates and normalizes one raw record.

    Args:
      record: Column name -> value (a string from CSV, a JSON value from
        JSONL). Columns not in the spec are ignored.

    Returns:
      `(client_key, x, y)`: the stripped client key, the normalized feature
      values in spec order, and the integer label.

    Raises:
      MalformedRecordError: With one of `REASONS` and a detail naming the
        column and value.
    """
    if self.client_key not in record:
      raise MalformedRecordError(MISSING_FIELD, f'no client key column {self.client_key!r}')
    key = record[self.client_key]
    key = '' if key is None else str(key).strip()
    if not key:
      raise MalformedRecordError(EMPTY_CLIENT_KEY, f'column {self.client_key!r} is empty')
    y = self._parse_label(record)
    names, lows, highs, shifts, scales = self._tables
    try:
      values = [record[name] for name in names]
      numbers = [float(v) for v in values]
    except (KeyError, TypeError, ValueError, OverflowError):
      numbers = None
    # Fast path for valid rows; any doubt is settled (and explained) by the
    # feature-by-feature check.
    if (
      numbers is None
      or bool in set(map(type, values))
      or not all(map(math.isfinite, numbers))
      or not all(map(operator.le, lows, numbers))
      or not all(map(operator.le, numbers, highs))
    ):
      return key, self._parse_features(record), y
    return key, [(v - shift) / scale for v, shift, scale in zip(numbers, shifts, scales)], y

  @functools.cached_property
  def _tables(self) -> tuple[tuple[Any, ...], ...]:
    """Per-feature (names, lows, highs, shifts, scales) for the fast path of parse_record."""
    shifts, scales = [], []
    for f in self.features:
      if f.mean is not None and f.std is not None:
        shifts.append(f.mean), scales.append(f.std)
      elif f.min is not None and f.max is not None:
        shifts.append(f.min), scales.append(f.max - f.min)
      else:
        shifts.append(0.0), scales.append(1.0)
    return (
      tuple(f.name for f in self.features),
      tuple(-math.inf if f.min is None else f.min for f in self.features),
      tuple(math.inf if f.max is None else f.max for f in self.features),
      tuple(shifts),
      tuple(scales),
    )

  def _parse_features(self, record: Mapping[str, Any]) -> list[float]:
    x = []
    for feature in self.features:
      if feature.name not in record:
        raise MalformedRecordError(MISSING_FIELD, f'no column {feature.name!r}')
      value = _parse_number(feature.name, record[feature.name])
      if (feature.min is not None and value < feature.min) or (
        feature.max is not None and value > feature.max
      ):
        raise MalformedRecordError(
          OUT_OF_RANGE, f'{feature.name}={value!r} is outside [{feature.min}, {feature.max}]'
        )
      x.append(feature.normalize(value))
    return x

  def _parse_label(self, record: Mapping[str, Any]) -> int:
    name = self.label.name
    if name not in record:
      raise MalformedRecordError(MISSING_FIELD, f'no label column {name!r}')
    raw = record[name]
    if raw is None or (isinstance(raw, str) and not raw.strip()):
      raise MalformedRecordError(MISSING_VALUE, f'label {name!r} is empty')
    if isinstance(raw, bool):
      raise MalformedRecordError(BAD_LABEL, f'{name}={raw!r} is not an integer')
    if isinstance(raw, int):
      y = raw
    else:
      try:
        number = float(raw.strip()) if isinstance(raw, str) else float(raw)
      except (TypeError, ValueError):
        raise MalformedRecordError(BAD_LABEL, f'{name}={_short(raw)} is not an integer') from None
      if not number.is_integer():
        raise MalformedRecordError(BAD_LABEL, f'{name}={_short(raw)} is not an integer')
      y = int(number)
    if not 0 <= y < self.label.num_classes:
      raise MalformedRecordError(BAD_LABEL, f'{name}={y} is outside [0, {self.label.num_classes})')
    return y


def _parse_number(name: str, raw: Any) -> float:
  """Parses a feature value; raises MalformedRecordError."""
  if raw is None or (isinstance(raw, str) and not raw.strip()):
    raise MalformedRecordError(MISSING_VALUE, f'{name} is empty')
  if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
    raise MalformedRecordError(NOT_A_NUMBER, f'{name}={_short(raw)} is not a number')
  try:
    value = float(raw)
  except (ValueError, OverflowError):
    raise MalformedRecordError(NOT_A_NUMBER, f'{name}={_short(raw)} is not a number') from None
  if not math.isfinite(value):
    raise MalformedRecordError(NON_FINITE, f'{name}={_short(raw)} is not finite')
  return value


def _short(value: Any, limit: int = 40) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + '...'


def _field(data: Mapping[str, Any], key: str, source: str, *, prefix: str = '') -> Any:
  if key not in data:
    raise FeatureSpecError(f'{source}: missing field "{prefix}{key}".')
  return data[key]


def _check_keys(data: Mapping[str, Any], allowed: frozenset[str], source: str, where: str) -> None:
  unknown = sorted(set(data) - allowed)
  if unknown:
    raise FeatureSpecError(
      f'{source}: unknown key(s) {unknown} in {where} (allowed: {sorted(allowed)}).'
    )


def _check_spec(
  client_key: Any, label: LabelSpec, features: Sequence[FeatureColumn], *, source: str
) -> None:
  """Raises FeatureSpecError naming `source` and the field if a spec is invalid."""
  if not isinstance(client_key, str) or not client_key:
    raise FeatureSpecError(f'{source}: field "client_key" must be a non-empty string.')
  if not isinstance(label.name, str) or not label.name:
    raise FeatureSpecError(f'{source}: field "label.name" must be a non-empty string.')
  if (
    isinstance(label.num_classes, bool)
    or not isinstance(label.num_classes, int)
    or label.num_classes < 2
  ):
    raise FeatureSpecError(
      f'{source}: field "label.num_classes" must be an integer >= 2, got {label.num_classes!r}.'
    )
  if not features:
    raise FeatureSpecError(f'{source}: field "features" is empty; list at least one feature.')
  seen = {client_key: 'client_key'}
  if label.name in seen:
    raise FeatureSpecError(f'{source}: "label.name" {label.name!r} is also the client key column.')
  seen[label.name] = 'label.name'
  for i, f in enumerate(features):
    where = f'features[{i}]'
    if not isinstance(f.name, str) or not f.name:
      raise FeatureSpecError(f'{source}: field "{where}.name" must be a non-empty string.')
    if f.name in seen:
      raise FeatureSpecError(
        f'{source}: "{where}.name" {f.name!r} repeats the column of "{seen[f.name]}"; '
        'column names must be unique.'
      )
    seen[f.name] = f'{where}.name'
    for key in ('min', 'max', 'mean', 'std'):
      value = getattr(f, key)
      if value is not None and not math.isfinite(value):
        raise FeatureSpecError(f'{source}: field "{where}.{key}" of {f.name!r} must be finite.')
    if f.min is not None and f.max is not None and not f.min < f.max:
      raise FeatureSpecError(
        f'{source}: feature {f.name!r} ({where}) has min {f.min} >= max {f.max}.'
      )
    if (f.mean is None) != (f.std is None):
      raise FeatureSpecError(
        f'{source}: feature {f.name!r} ({where}) has only one of mean/std; give both or neither.'
      )
    if f.std is not None and f.std <= 0:
      raise FeatureSpecError(f'{source}: feature {f.name!r} ({where}) has std {f.std} <= 0.')


def _read_text(path: str) -> str:
  if '://' in path:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as f:
      return f.read().decode('utf-8')
  with open(os.fspath(path), encoding='utf-8') as f:
    return f.read()
