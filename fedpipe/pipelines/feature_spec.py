"""The feature spec: which raw columns make a client's examples, and how.

A feature spec is a small JSON file the data owner writes next to the raw
data. Version 1 has numeric features and a class label:

    {"schema_version": 1,
     "client_key": "client_id",
     "label": {"name": "label", "num_classes": 10},
     "features": [{"name": "pixel_0_0", "min": 0.0, "max": 16.0}, ...]}

Version 2 adds label tasks, an example-weight column and categorical
features:

    {"schema_version": 2,
     "client_key": "client_id",
     "label": {"name": "label", "task": "multiclass", "num_classes": 10},
     "weight": {"name": "w"},
     "features": [
       {"name": "age", "type": "numeric", "min": 18, "max": 100, "mean": 41.2, "std": 12.0},
       {"name": "region", "type": "categorical", "vocabulary": ["north", "south"],
        "max_values_per_user": 1}]}

* `label.task`: 'multiclass' (an integer in [0, num_classes), `num_classes`
  >= 2 required; the default, and what a version 1 spec means), 'binary'
  (0/1, also "0"/"1" and true/false; no `num_classes`) or 'regression' (a
  finite number; optional `min`/`max` validation bounds).
* `weight` (optional): the example-weight column, a finite number >= 0 (and
  <= its optional `max`).
* A numeric feature (`type` 'numeric', the default) may carry `min`/`max`
  (validation bounds: a value outside them makes its record malformed) and
  `mean`/`std` (standardization). A value is written as `(v - mean) / std` if
  mean/std are given, else as `(v - min) / (max - min)` if both bounds are
  given, else as read.
* A categorical feature's value is the stripped text of the raw value (a JSON
  number as `str()` writes it, e.g. 3 -> "3"; a JSON boolean as "true" or
  "false"). In `x` it is a one-hot slice of width `len(vocabulary) + 1`, the
  last slot the out-of-vocabulary bucket (`input_layout` says where each
  column sits). `max_values_per_user` bounds how many distinct values one
  user contributes to federated statistics. A categorical feature without a
  `vocabulary` makes a *draft* spec (`is_draft`): it loads, and federated
  statistics (`fedpipe-stats`) fills in the vocabulary, but it cannot encode
  records.

`FeatureSpec.to_json` writes the oldest schema version that can express the
spec: version 1 unless it uses a version 2 field, so version 1 specs (and the
manifests that embed them) stay as they were.

`FeatureSpec.parse_columns` validates one raw record into its raw column
values (`ParsedColumns`); `parse_record` turns it into `(client_key, x, y)`
and `parse_weighted_record` into `(client_key, x, y, w)`. Each raises
`MalformedRecordError` with a stable reason code (see `REASONS`); the
preprocessing pipeline sends such records to its dead letter.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
import os
from collections.abc import Iterable, Mapping
from typing import Any

from fedpipe.data import record_schema
from fedpipe.errors import FedpipeError

# The newest schema version; `SCHEMA_VERSIONS` are those `from_json` reads.
SCHEMA_VERSION = 2
SCHEMA_VERSIONS = (1, 2)

# Feature kinds (a feature's "type" in the JSON form, `FeatureColumn.kind`).
NUMERIC = 'numeric'
CATEGORICAL = 'categorical'
KINDS = (NUMERIC, CATEGORICAL)
# Label tasks (`label.task`), as the record schema defines them.
MULTICLASS = record_schema.MULTICLASS
BINARY = record_schema.BINARY
REGRESSION = record_schema.REGRESSION
TASKS = record_schema.LABEL_TASKS
# The most values a categorical feature's vocabulary may list.
MAX_VOCABULARY = 10_000

# Reason codes of malformed records. They are stable: dashboards and the
# manifest's dead-letter counts use them.
MISSING_FIELD = 'missing_field'  # A spec column is absent from the record.
MISSING_VALUE = 'missing_value'  # A feature, label or weight is present but empty/null.
NOT_A_NUMBER = 'not_a_number'  # A feature value does not parse as a number.
NON_FINITE = 'non_finite'  # A feature value is NaN or infinite.
OUT_OF_RANGE = 'out_of_range'  # A feature value is outside its [min, max].
BAD_LABEL = 'bad_label'  # The label is not valid for its task (class, 0/1, finite number).
EMPTY_CLIENT_KEY = 'empty_client_key'  # The client key is empty.
BAD_JSON = 'bad_json'  # A JSONL line is not a JSON object.
WRONG_COLUMN_COUNT = 'wrong_column_count'  # A CSV row's length != header's.
BAD_ENCODING = 'bad_encoding'  # A line is not valid UTF-8.
BAD_CSV = 'bad_csv'  # A CSV record the csv module rejects (e.g. an over-long field).
LABEL_OUT_OF_RANGE = 'label_out_of_range'  # A regression label is outside its [min, max].
BAD_WEIGHT = 'bad_weight'  # The weight is not a finite number in [0, max].
BAD_CATEGORY = 'bad_category'  # A categorical value is a JSON list or object.
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
  LABEL_OUT_OF_RANGE,
  BAD_WEIGHT,
  BAD_CATEGORY,
)

_BOUNDS = ('min', 'max', 'mean', 'std')
_TOP_KEYS = {
  1: frozenset({'schema_version', 'client_key', 'label', 'features'}),
  2: frozenset({'schema_version', 'client_key', 'label', 'features', 'weight'}),
}
_LABEL_KEYS = {
  1: frozenset({'name', 'num_classes'}),
  MULTICLASS: frozenset({'name', 'task', 'num_classes'}),
  BINARY: frozenset({'name', 'task'}),
  REGRESSION: frozenset({'name', 'task', 'min', 'max'}),
}
_FEATURE_KEYS = {
  1: frozenset({'name', *_BOUNDS}),
  NUMERIC: frozenset({'name', 'type', *_BOUNDS}),
  CATEGORICAL: frozenset({'name', 'type', 'vocabulary', 'max_values_per_user'}),
}
_WEIGHT_KEYS = frozenset({'name', 'max'})


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
  """One input column: numeric, or categorical (a one-hot slice of `x`).

  Attributes:
    name: The column name in the raw data.
    min: Smallest valid value, or None for no lower bound (numeric).
    max: Largest valid value, or None for no upper bound (numeric).
    mean: Standardization mean (with `std`), or None (numeric).
    std: Standardization standard deviation (> 0, with `mean`), or None (numeric).
    kind: `NUMERIC` or `CATEGORICAL`.
    vocabulary: A categorical feature's values, in one-hot order (the
      out-of-vocabulary slot follows them); None: not known yet (a draft).
    max_values_per_user: How many distinct values of a categorical feature
      one user may contribute to federated statistics.
  """

  name: str
  min: float | None = None
  max: float | None = None
  mean: float | None = None
  std: float | None = None
  kind: str = NUMERIC
  vocabulary: tuple[str, ...] | None = None
  max_values_per_user: int = 1

  def __post_init__(self):
    if isinstance(self.vocabulary, list):
      object.__setattr__(self, 'vocabulary', tuple(self.vocabulary))

  @property
  def width(self) -> int:
    """How many values of `x` the column takes: 1, or the vocabulary's size plus 1."""
    if self.kind != CATEGORICAL:
      return 1
    if self.vocabulary is None:
      raise _draft_error(self.name)
    return len(self.vocabulary) + 1

  def normalize(self, value: float) -> float:
    """Returns `value` standardized, min-max scaled, or as is (see module doc)."""
    if self.mean is not None and self.std is not None:
      return (value - self.mean) / self.std
    if self.min is not None and self.max is not None:
      return (value - self.min) / (self.max - self.min)
    return value

  def to_json(self) -> dict[str, Any]:
    out: dict[str, Any] = {'name': self.name}
    if self.kind == CATEGORICAL:
      out['type'] = CATEGORICAL
      if self.vocabulary is not None:
        out['vocabulary'] = list(self.vocabulary)
      out['max_values_per_user'] = self.max_values_per_user
      return out
    for key in _BOUNDS:
      if getattr(self, key) is not None:
        out[key] = getattr(self, key)
    return out

  @functools.cached_property
  def _index(self) -> dict[str, int]:
    """Value -> its one-hot slot (a categorical feature with a vocabulary)."""
    return {value: i for i, value in enumerate(self.vocabulary or ())}


@dataclasses.dataclass(frozen=True)
class LabelSpec:
  """The label column and its task.

  Attributes:
    name: The column name in the raw data.
    num_classes: The number of classes of a 'multiclass' label (integers in
      [0, num_classes)); None for the other tasks.
    task: `MULTICLASS`, `BINARY` (0 or 1) or `REGRESSION` (a finite number).
    min: A regression label's smallest valid value, or None.
    max: A regression label's largest valid value, or None.
  """

  name: str
  num_classes: int | None = None
  task: str = MULTICLASS
  min: float | None = None
  max: float | None = None

  @property
  def num_outputs(self) -> int:
    """The model's output width: one per class (multiclass), else 1 (a logit or a value)."""
    return self.num_classes if self.task == MULTICLASS else 1

  def to_json(self, version: int = SCHEMA_VERSION) -> dict[str, Any]:
    if version == 1:
      return {'name': self.name, 'num_classes': self.num_classes}
    out: dict[str, Any] = {'name': self.name, 'task': self.task}
    if self.task == MULTICLASS:
      out['num_classes'] = self.num_classes
    for key in ('min', 'max'):
      if getattr(self, key) is not None:
        out[key] = getattr(self, key)
    return out


@dataclasses.dataclass(frozen=True)
class WeightSpec:
  """The example-weight column: finite numbers >= 0 (and <= `max` if given)."""

  name: str
  max: float | None = None

  def to_json(self) -> dict[str, Any]:
    return {'name': self.name} if self.max is None else {'name': self.name, 'max': self.max}


@dataclasses.dataclass(frozen=True)
class InputSlice:
  """Where one feature column sits in `x`.

  Attributes:
    name: The column name.
    kind: `NUMERIC` or `CATEGORICAL`.
    start: Its first index in `x`.
    width: How many values it takes: 1 (numeric), or `len(vocabulary) + 1`
      (categorical: one-hot, the last slot out-of-vocabulary).
    vocabulary: A categorical column's values in slot order; None for numeric.
  """

  name: str
  kind: str
  start: int
  width: int
  vocabulary: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class ParsedColumns:
  """One raw record's validated column values, before encoding.

  Attributes:
    client_key: The stripped client key.
    numeric: The numeric features' values, bounds-checked, not normalized,
      in the order of the spec's numeric features.
    categorical: The categorical features' stripped values, in the order of
      the spec's categorical features (in the vocabulary or not).
    label: The label: an int for 'multiclass' and 'binary', a float for
      'regression'.
    weight: The example weight (1.0 without a weight column).
  """

  client_key: str
  numeric: tuple[float, ...]
  categorical: tuple[str, ...]
  label: int | float
  weight: float


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """Which raw columns make an example, how to validate and encode them.

  Attributes:
    client_key: The column holding the client key.
    label: The label column.
    features: The feature columns, in the order of the written `x` vector.
    weight: The example-weight column, or None.
  """

  client_key: str
  label: LabelSpec
  features: tuple[FeatureColumn, ...]
  weight: WeightSpec | None = None

  def __post_init__(self):
    object.__setattr__(self, 'features', tuple(self.features))
    _check_spec(self, source='feature spec')

  @property
  def is_draft(self) -> bool:
    """True if a categorical feature has no vocabulary yet (run `fedpipe-stats`)."""
    return any(f.kind == CATEGORICAL and f.vocabulary is None for f in self.features)

  @property
  def schema_version(self) -> int:
    """The oldest schema version that expresses the spec (what `to_json` writes)."""
    uses_v2 = (
      self.weight is not None
      or self.label.task != MULTICLASS
      or any(f.kind != NUMERIC for f in self.features)
    )
    return 2 if uses_v2 else 1

  @property
  def num_features(self) -> int:
    """The width of `x`: one per numeric feature, vocabulary + 1 per categorical one.

    Raises:
      FeatureSpecError: If the spec is a draft (`is_draft`).
    """
    return sum(f.width for f in self.features)

  @property
  def num_classes(self) -> int:
    """The label's classes: `label.num_classes`, 2 for 'binary', 0 for 'regression'."""
    if self.label.task == MULTICLASS:
      return self.label.num_classes
    return 2 if self.label.task == BINARY else 0

  @property
  def num_outputs(self) -> int:
    """The model's output width (`LabelSpec.num_outputs`)."""
    return self.label.num_outputs

  @property
  def columns(self) -> tuple[str, ...]:
    """All columns a record needs: client key, label, the weight if any, then the features."""
    weight = () if self.weight is None else (self.weight.name,)
    return (self.client_key, self.label.name, *weight) + tuple(f.name for f in self.features)

  def input_layout(self) -> tuple[InputSlice, ...]:
    """Where each feature column sits in `x`, in spec order.

    Raises:
      FeatureSpecError: If the spec is a draft (`is_draft`).
    """
    out, start = [], 0
    for f in self.features:
      width = f.width
      out.append(InputSlice(f.name, f.kind, start, width, f.vocabulary))
      start += width
    return tuple(out)

  def to_json(self) -> dict[str, Any]:
    version = self.schema_version
    out: dict[str, Any] = {
      'schema_version': version,
      'client_key': self.client_key,
      'label': self.label.to_json(version),
    }
    if self.weight is not None:
      out['weight'] = self.weight.to_json()
    out['features'] = [f.to_json() for f in self.features]
    return out

  @classmethod
  def from_json(cls, data: Any, *, source: str = 'feature spec') -> FeatureSpec:
    """Builds a spec from its JSON form (schema version 1 or 2).

    Args:
      data: The parsed JSON object.
      source: Where it came from (a file name), for error messages.

    Returns:
      The spec (a draft if a categorical feature lists no vocabulary).

    Raises:
      FeatureSpecError: If a field is missing, unknown, of the wrong type or
        value; the message names `source` and the field.
    """
    if not isinstance(data, Mapping):
      raise FeatureSpecError(f'{source}: expected a JSON object, got {type(data).__name__}.')
    version = _field(data, 'schema_version', source)
    if isinstance(version, bool) or version not in SCHEMA_VERSIONS:
      raise FeatureSpecError(
        f'{source}: schema_version {version!r} is not supported (this fedpipe reads '
        f'{", ".join(map(str, SCHEMA_VERSIONS))}); rewrite the spec in version '
        f'{SCHEMA_VERSION} format.'
      )
    _check_keys(data, _TOP_KEYS[version], source, 'the top level', version)
    client_key = _field(data, 'client_key', source)
    label = _label_from_json(_field(data, 'label', source), version, source)
    weight = None
    if data.get('weight') is not None:
      weight = _weight_from_json(data['weight'], source)
    features_json = _field(data, 'features', source)
    if not isinstance(features_json, list):
      raise FeatureSpecError(f'{source}: field "features" must be a list of objects.')
    features = tuple(
      _feature_from_json(feature, f'features[{i}]', version, source)
      for i, feature in enumerate(features_json)
    )
    spec = object.__new__(cls)
    for name, value in (
      ('client_key', client_key),
      ('label', label),
      ('features', features),
      ('weight', weight),
    ):
      object.__setattr__(spec, name, value)
    _check_spec(spec, source=source)
    return cls(client_key=client_key, label=label, features=features, weight=weight)

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

  def check_not_draft(self) -> None:
    """Raises FeatureSpecError if the spec is a draft (`is_draft`), naming the feature and the fix."""
    for f in self.features:
      if f.kind == CATEGORICAL and f.vocabulary is None:
        raise _draft_error(f.name)

  def parse_columns(self, record: Mapping[str, Any]) -> ParsedColumns:
    """Validates one raw record into its column values, without encoding them.

    Needs no vocabulary (a draft spec parses records too): categorical
    values come back as text.

    Args:
      record: Column name -> value (a string from CSV, a JSON value from
        JSONL). Columns not in the spec are ignored.

    Returns:
      The `ParsedColumns`.

    Raises:
      MalformedRecordError: With one of `REASONS` and a detail naming the
        column and value, exactly as `parse_record` does.
    """
    key = self._parse_key(record)
    label = self._parse_label(record)
    weight = 1.0 if self.weight is None else self._parse_weight(record)
    numeric, categorical = [], []
    for feature in self.features:
      if feature.kind == CATEGORICAL:
        categorical.append(_parse_category(feature.name, record))
      else:
        numeric.append(_parse_feature(feature, record))
    return ParsedColumns(key, tuple(numeric), tuple(categorical), label, weight)

  def parse_record(self, record: Mapping[str, Any]) -> tuple[str, list[float], int | float]:
    """Validates and encodes one raw record (its weight, if any, is checked, not returned).

    Args:
      record: Column name -> value (a string from CSV, a JSON value from
        JSONL). Columns not in the spec are ignored.

    Returns:
      `(client_key, x, y)`: the stripped client key, the encoded feature
      values (`input_layout`), and the label (an int, or a float for
      'regression').

    Raises:
      MalformedRecordError: With one of `REASONS` and a detail naming the
        column and value.
      FeatureSpecError: If the spec is a draft (`is_draft`).
    """
    key = self._parse_key(record)
    y = self._parse_label(record)
    if self.weight is not None:
      self._parse_weight(record)
    return key, self._encode_features(record), y

  def parse_weighted_record(
    self, record: Mapping[str, Any]
  ) -> tuple[str, list[float], int | float, float]:
    """As `parse_record`, plus the example weight: `(client_key, x, y, w)`.

    `w` is 1.0 without a weight column.
    """
    key = self._parse_key(record)
    y = self._parse_label(record)
    w = 1.0 if self.weight is None else self._parse_weight(record)
    return key, self._encode_features(record), y, w

  def _parse_key(self, record: Mapping[str, Any]) -> str:
    if self.client_key not in record:
      raise MalformedRecordError(MISSING_FIELD, f'no client key column {self.client_key!r}')
    key = record[self.client_key]
    key = '' if key is None else str(key).strip()
    if not key:
      raise MalformedRecordError(EMPTY_CLIENT_KEY, f'column {self.client_key!r} is empty')
    return key

  def _encode_features(self, record: Mapping[str, Any]) -> list[float]:
    names, lows, highs, shifts, scales = self._tables
    if names is None:  # Categorical features: feature by feature.
      return self._parse_features(record)
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
      return self._parse_features(record)
    return [(v - shift) / scale for v, shift, scale in zip(numbers, shifts, scales)]

  @functools.cached_property
  def _tables(self) -> tuple[Any, ...]:
    """Per-feature (names, lows, highs, shifts, scales) for the numeric fast path.

    All None if a feature is categorical (no fast path).

    Raises:
      FeatureSpecError: If the spec is a draft.
    """
    self.check_not_draft()
    if any(f.kind != NUMERIC for f in self.features):
      return (None,) * 5
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
    self.check_not_draft()
    x: list[float] = []
    for feature in self.features:
      if feature.kind == CATEGORICAL:
        one_hot = [0.0] * (len(feature.vocabulary) + 1)
        value = _parse_category(feature.name, record)
        one_hot[feature._index.get(value, len(feature.vocabulary))] = 1.0
        x.extend(one_hot)
      else:
        x.append(feature.normalize(_parse_feature(feature, record)))
    return x

  def _parse_label(self, record: Mapping[str, Any]) -> int | float:
    name = self.label.name
    if name not in record:
      raise MalformedRecordError(MISSING_FIELD, f'no label column {name!r}')
    raw = record[name]
    if raw is None or (isinstance(raw, str) and not raw.strip()):
      raise MalformedRecordError(MISSING_VALUE, f'label {name!r} is empty')
    task = self.label.task
    if task == REGRESSION:
      return self._parse_regression_label(name, raw)
    if task == BINARY:
      return _parse_binary_label(name, raw)
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

  def _parse_regression_label(self, name: str, raw: Any) -> float:
    y = _parse_number(f'label {name}', raw, not_a_number=BAD_LABEL, non_finite=BAD_LABEL)
    low, high = self.label.min, self.label.max
    if (low is not None and y < low) or (high is not None and y > high):
      raise MalformedRecordError(
        LABEL_OUT_OF_RANGE, f'label {name}={y!r} is outside [{low}, {high}]'
      )
    return y

  def _parse_weight(self, record: Mapping[str, Any]) -> float:
    name = self.weight.name
    if name not in record:
      raise MalformedRecordError(MISSING_FIELD, f'no weight column {name!r}')
    raw = record[name]
    if raw is None or (isinstance(raw, str) and not raw.strip()):
      raise MalformedRecordError(MISSING_VALUE, f'weight {name!r} is empty')
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
      raise MalformedRecordError(BAD_WEIGHT, f'weight {name}={_short(raw)} is not a number')
    try:
      w = float(raw)
    except (ValueError, OverflowError):
      raise MalformedRecordError(
        BAD_WEIGHT, f'weight {name}={_short(raw)} is not a number'
      ) from None
    high = math.inf if self.weight.max is None else self.weight.max
    if not math.isfinite(w) or not 0.0 <= w <= high:
      raise MalformedRecordError(
        BAD_WEIGHT, f'weight {name}={_short(raw)} is not a finite number in [0, {high}]'
      )
    return w


def _draft_error(name: str) -> FeatureSpecError:
  return FeatureSpecError(
    f'categorical feature {name!r} has no vocabulary: the feature spec is a draft and cannot '
    'encode records; run fedpipe-stats (it computes the shared vocabulary and writes the '
    f'completed spec), or list the values in the feature\'s "vocabulary".'
  )


def _parse_binary_label(name: str, raw: Any) -> int:
  if isinstance(raw, bool):
    return int(raw)
  if isinstance(raw, (int, float)) and raw in (0, 1):
    return int(raw)
  if isinstance(raw, str):
    text = raw.strip().lower()
    if text in ('true', 'false'):
      return int(text == 'true')
    try:
      number = float(text)
    except ValueError:
      number = None
    if number in (0.0, 1.0):
      return int(number)
  raise MalformedRecordError(BAD_LABEL, f'{name}={_short(raw)} is not 0/1 or true/false')


def _parse_category(name: str, record: Mapping[str, Any]) -> str:
  """A categorical value as text; raises MalformedRecordError."""
  if name not in record:
    raise MalformedRecordError(MISSING_FIELD, f'no column {name!r}')
  raw = record[name]
  if isinstance(raw, str):
    value = raw.strip()
  elif isinstance(raw, bool):
    value = 'true' if raw else 'false'
  elif isinstance(raw, (int, float)):
    value = str(raw)
  elif raw is None:
    value = ''
  else:
    raise MalformedRecordError(
      BAD_CATEGORY, f'{name}={_short(raw)} is not a text, number or boolean'
    )
  if not value:
    raise MalformedRecordError(MISSING_VALUE, f'{name} is empty')
  return value


def _parse_feature(feature: FeatureColumn, record: Mapping[str, Any]) -> float:
  """A numeric feature's bounds-checked value; raises MalformedRecordError."""
  if feature.name not in record:
    raise MalformedRecordError(MISSING_FIELD, f'no column {feature.name!r}')
  value = _parse_number(feature.name, record[feature.name])
  if (feature.min is not None and value < feature.min) or (
    feature.max is not None and value > feature.max
  ):
    raise MalformedRecordError(
      OUT_OF_RANGE, f'{feature.name}={value!r} is outside [{feature.min}, {feature.max}]'
    )
  return value


def _parse_number(
  name: str, raw: Any, *, not_a_number: str = NOT_A_NUMBER, non_finite: str = NON_FINITE
) -> float:
  """Parses a feature value (or a regression label, with its own reasons); raises MalformedRecordError."""
  if raw is None or (isinstance(raw, str) and not raw.strip()):
    raise MalformedRecordError(MISSING_VALUE, f'{name} is empty')
  if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
    raise MalformedRecordError(not_a_number, f'{name}={_short(raw)} is not a number')
  try:
    value = float(raw)
  except (ValueError, OverflowError):
    raise MalformedRecordError(not_a_number, f'{name}={_short(raw)} is not a number') from None
  if not math.isfinite(value):
    raise MalformedRecordError(non_finite, f'{name}={_short(raw)} is not finite')
  return value


def _short(value: Any, limit: int = 40) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + '...'


def _field(data: Mapping[str, Any], key: str, source: str, *, prefix: str = '') -> Any:
  if key not in data:
    raise FeatureSpecError(f'{source}: missing field "{prefix}{key}".')
  return data[key]


def _check_keys(
  data: Mapping[str, Any],
  allowed: frozenset[str],
  source: str,
  where: str,
  version: int = SCHEMA_VERSION,
  hint: str = '',
) -> None:
  unknown = sorted(set(data) - allowed)
  if unknown:
    if version == 1 and set(unknown) & {'weight', 'task', 'type', 'vocabulary'}:
      hint = f'{hint}; set "schema_version": 2 to use the version 2 fields'
    raise FeatureSpecError(
      f'{source}: unknown key(s) {unknown} in {where} (allowed: {sorted(allowed)}){hint}.'
    )


def _number(value: Any, where: str, source: str) -> float | None:
  """A JSON number field as a float (None if absent); raises FeatureSpecError naming `where`."""
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise FeatureSpecError(f'{source}: field "{where}" must be a number, got {_short(value)}.')
  return float(value)


def _label_from_json(label: Any, version: int, source: str) -> LabelSpec:
  if not isinstance(label, Mapping):
    raise FeatureSpecError(
      f'{source}: field "label" must be an object with "name" and "num_classes" (or "task").'
    )
  task = label.get('task', MULTICLASS) if version == 2 else MULTICLASS
  if task not in TASKS:
    raise FeatureSpecError(
      f'{source}: field "label.task" is {_short(task)}; it must be one of '
      f'{", ".join(repr(t) for t in TASKS)}.'
    )
  _check_keys(
    label,
    _LABEL_KEYS[1 if version == 1 else task],
    source,
    'field "label"',
    version,
    '' if version == 1 else f' for label.task {task!r}',
  )
  name = _field(label, 'name', source, prefix='label.')
  num_classes = None
  if task == MULTICLASS:
    num_classes = _field(label, 'num_classes', source, prefix='label.')
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
      raise FeatureSpecError(
        f'{source}: field "label.num_classes" must be an integer, got {_short(num_classes)}.'
      )
  return LabelSpec(
    name=name,
    num_classes=num_classes,
    task=task,
    min=_number(label.get('min'), 'label.min', source),
    max=_number(label.get('max'), 'label.max', source),
  )


def _weight_from_json(weight: Any, source: str) -> WeightSpec:
  if not isinstance(weight, Mapping):
    raise FeatureSpecError(
      f'{source}: field "weight" must be an object with "name" (the example-weight column), '
      f'got {_short(weight)}.'
    )
  _check_keys(weight, _WEIGHT_KEYS, source, 'field "weight"')
  return WeightSpec(
    name=_field(weight, 'name', source, prefix='weight.'),
    max=_number(weight.get('max'), 'weight.max', source),
  )


def _feature_from_json(feature: Any, where: str, version: int, source: str) -> FeatureColumn:
  if not isinstance(feature, Mapping):
    raise FeatureSpecError(f'{source}: field "{where}" must be an object, got {_short(feature)}.')
  kind = feature.get('type', NUMERIC) if version == 2 else NUMERIC
  if kind not in KINDS:
    raise FeatureSpecError(
      f'{source}: field "{where}.type" is {_short(kind)}; it must be one of '
      f'{", ".join(repr(k) for k in KINDS)}.'
    )
  _check_keys(
    feature,
    _FEATURE_KEYS[1 if version == 1 else kind],
    source,
    f'field "{where}"',
    version,
    '' if version == 1 else f' for a {kind} feature',
  )
  name = _field(feature, 'name', source, prefix=f'{where}.')
  if kind == CATEGORICAL:
    vocabulary = feature.get('vocabulary')
    if vocabulary is not None and not isinstance(vocabulary, list):
      raise FeatureSpecError(
        f'{source}: field "{where}.vocabulary" of feature {_short(name)} must be a list of '
        f'strings, got {_short(vocabulary)}.'
      )
    return FeatureColumn(
      name=name,
      kind=CATEGORICAL,
      vocabulary=None if vocabulary is None else tuple(vocabulary),
      max_values_per_user=feature.get('max_values_per_user', 1),
    )
  bounds = {}
  for key in _BOUNDS:
    value = feature.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
      raise FeatureSpecError(
        f'{source}: field "{where}.{key}" of feature {name!r} must be a number, got {value!r}.'
      )
    bounds[key] = None if value is None else float(value)
  return FeatureColumn(name=name, **bounds)


def _is_number(value: Any) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, float))


def _check_spec(spec: FeatureSpec, *, source: str) -> None:
  """Raises FeatureSpecError naming `source` and the field if a spec is invalid."""
  client_key, label, features, weight = spec.client_key, spec.label, spec.features, spec.weight
  if not isinstance(client_key, str) or not client_key:
    raise FeatureSpecError(f'{source}: field "client_key" must be a non-empty string.')
  if not isinstance(label, LabelSpec):
    raise FeatureSpecError(f'{source}: field "label" must be a LabelSpec, got {_short(label)}.')
  if not isinstance(label.name, str) or not label.name:
    raise FeatureSpecError(f'{source}: field "label.name" must be a non-empty string.')
  if label.task not in TASKS:
    raise FeatureSpecError(
      f'{source}: field "label.task" is {_short(label.task)}; it must be one of '
      f'{", ".join(repr(t) for t in TASKS)}.'
    )
  if label.task == MULTICLASS:
    if (
      isinstance(label.num_classes, bool)
      or not isinstance(label.num_classes, int)
      or label.num_classes < 2
    ):
      raise FeatureSpecError(
        f'{source}: field "label.num_classes" must be an integer >= 2, got {label.num_classes!r}.'
      )
  elif label.num_classes is not None:
    raise FeatureSpecError(
      f'{source}: field "label.num_classes" is for label.task "multiclass"; a '
      f'{label.task} label has none: remove it.'
    )
  if label.task != REGRESSION and (label.min is not None or label.max is not None):
    raise FeatureSpecError(
      f'{source}: fields "label.min"/"label.max" are for label.task "regression"; remove them.'
    )
  for key in ('min', 'max'):
    value = getattr(label, key)
    if value is not None and (not _is_number(value) or not math.isfinite(value)):
      raise FeatureSpecError(f'{source}: field "label.{key}" must be a finite number.')
  if label.min is not None and label.max is not None and not label.min < label.max:
    raise FeatureSpecError(
      f'{source}: field "label.min" {label.min} must be below "label.max" {label.max}.'
    )
  if not features:
    raise FeatureSpecError(f'{source}: field "features" is empty; list at least one feature.')
  seen = {client_key: 'client_key'}
  if label.name in seen:
    raise FeatureSpecError(f'{source}: "label.name" {label.name!r} is also the client key column.')
  seen[label.name] = 'label.name'
  if weight is not None:
    if not isinstance(weight, WeightSpec):
      raise FeatureSpecError(
        f'{source}: field "weight" must be a WeightSpec or None, got {_short(weight)}.'
      )
    if not isinstance(weight.name, str) or not weight.name:
      raise FeatureSpecError(f'{source}: field "weight.name" must be a non-empty string.')
    if weight.name in seen:
      raise FeatureSpecError(
        f'{source}: "weight.name" {weight.name!r} repeats the column of "{seen[weight.name]}"; '
        'column names must be unique.'
      )
    seen[weight.name] = 'weight.name'
    if weight.max is not None and (
      not _is_number(weight.max) or not math.isfinite(weight.max) or weight.max <= 0
    ):
      raise FeatureSpecError(
        f'{source}: field "weight.max" must be a finite number > 0, got {weight.max!r}.'
      )
  for i, f in enumerate(features):
    where = f'features[{i}]'
    if not isinstance(f, FeatureColumn):
      raise FeatureSpecError(f'{source}: field "{where}" must be a FeatureColumn, got {f!r}.')
    if not isinstance(f.name, str) or not f.name:
      raise FeatureSpecError(f'{source}: field "{where}.name" must be a non-empty string.')
    if f.name in seen:
      raise FeatureSpecError(
        f'{source}: "{where}.name" {f.name!r} repeats the column of "{seen[f.name]}"; '
        'column names must be unique.'
      )
    seen[f.name] = f'{where}.name'
    if f.kind not in KINDS:
      raise FeatureSpecError(
        f'{source}: field "{where}.type" of {f.name!r} is {_short(f.kind)}; it must be one of '
        f'{", ".join(repr(k) for k in KINDS)}.'
      )
    if f.kind == CATEGORICAL:
      _check_categorical(f, where, source)
    else:
      _check_numeric(f, where, source)


def _check_numeric(f: FeatureColumn, where: str, source: str) -> None:
  if f.vocabulary is not None:
    raise FeatureSpecError(
      f'{source}: field "{where}.vocabulary" of {f.name!r}: only categorical features have '
      'a vocabulary; set "type": "categorical" or remove it.'
    )
  if f.max_values_per_user != 1:
    raise FeatureSpecError(
      f'{source}: field "{where}.max_values_per_user" of {f.name!r}: only categorical '
      'features take it; remove it.'
    )
  for key in _BOUNDS:
    value = getattr(f, key)
    if value is not None and (not _is_number(value) or not math.isfinite(value)):
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


def _check_categorical(f: FeatureColumn, where: str, source: str) -> None:
  for key in _BOUNDS:
    if getattr(f, key) is not None:
      raise FeatureSpecError(
        f'{source}: field "{where}.{key}" of categorical feature {f.name!r}: bounds and '
        'standardization are for numeric features; remove it.'
      )
  n = f.max_values_per_user
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise FeatureSpecError(
      f'{source}: field "{where}.max_values_per_user" of {f.name!r} must be an integer >= 1, '
      f'got {_short(n)}.'
    )
  vocabulary = f.vocabulary
  if vocabulary is None:
    return  # A draft: federated statistics fills it in.
  field = f'"{where}.vocabulary" of {f.name!r}'
  if not isinstance(vocabulary, tuple):
    raise FeatureSpecError(
      f'{source}: field {field} must be a list of strings, got {_short(vocabulary)}.'
    )
  if not vocabulary:
    raise FeatureSpecError(
      f'{source}: field {field} is empty; list the values, or leave "vocabulary" out for '
      'fedpipe-stats to compute it.'
    )
  if len(vocabulary) > MAX_VOCABULARY:
    raise FeatureSpecError(
      f'{source}: field {field} lists {len(vocabulary)} values, more than the '
      f'{MAX_VOCABULARY} allowed; keep the most frequent values (the others share the '
      'out-of-vocabulary slot).'
    )
  seen = set()
  for j, value in enumerate(vocabulary):
    if not isinstance(value, str) or not value or value != value.strip():
      raise FeatureSpecError(
        f'{source}: field {field}: entry [{j}] {_short(value)} must be a non-empty string '
        'without leading or trailing spaces (values are compared stripped).'
      )
    if value in seen:
      raise FeatureSpecError(
        f'{source}: field {field}: entry [{j}] {value!r} repeats an earlier entry; list each '
        'value once.'
      )
    seen.add(value)


def _read_text(path: str) -> str:
  if '://' in path:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as f:
      return f.read().decode('utf-8')
  with open(os.fspath(path), encoding='utf-8') as f:
    return f.read()
