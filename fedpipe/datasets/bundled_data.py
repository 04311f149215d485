"""Bundled raw data: a scikit-learn dataset laid out the way a data owner holds it.

`write_bundled_dataset` writes, into `raw_dir`,

    train.csv | train.jsonl    client_id, label, one column per feature
    test.csv  | test.jsonl     the held-out rows, same columns
    feature_spec.json          the spec the preprocessing pipeline reads
    generation.json            the parameters these files were written for

from a dataset shipped inside scikit-learn (nothing is downloaded). The test
split is a fixed, stratified, seeded fraction of the rows. Training rows are
assigned to `num_clients` clients, either IID (shuffled, then split into
near-equal parts) or with Dirichlet label skew (per class, the class's rows are
divided among clients in proportions drawn from Dir(alpha); Hsu et al. 2019);
no client is left empty. Test rows are assigned to the same clients uniformly
at random.

`data.source='synthetic_credit'` is generated instead (see
fedpipe/datasets/synthetic_credit.py): `num_clients` users whose rows are
theirs (no partition), numeric and categorical columns, a binary label of
known law, a schema-version-2 draft feature spec, and next to it
`feature_spec_central.json`, the spec completed from the pooled training rows
(for a central baseline only). Its test split is the same stratified, seeded
fraction of the rows; test rows keep their users, every user keeping at least
one training row.

References:
  Hsu, Qi, Brown. Measuring the Effects of Non-Identical Data Distribution for
  Federated Visual Classification. arXiv:1909.06335, 2019.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fedpipe.data import atomic_files
from fedpipe.datasets import synthetic_credit
from fedpipe.errors import FedpipeError
from fedpipe.pipelines import feature_spec as feature_spec_lib

GENERATION_FILENAME = 'generation.json'
FEATURE_SPEC_FILENAME = 'feature_spec.json'
RAW_FORMATS = ('csv', 'jsonl')
PARTITIONS = ('iid', 'dirichlet')
CLIENT_KEY_COLUMN = 'client_id'
LABEL_COLUMN = 'label'
# Bump when the files written for the same parameters change.
GENERATOR_VERSION = 1


class BundledDataError(FedpipeError, ValueError):
  """The bundled-data parameters are invalid, or the raw directory is not ours to replace."""


@dataclasses.dataclass(frozen=True)
class _Source:
  load: Callable[[], Any]
  # 'minmax': the dataset's known value range as validation bounds and
  # scaling; 'standardize': mean/std of the training split.
  scaling: str
  value_range: tuple[float, float] | None = None


def _sklearn_loader(name: str) -> Callable[[], Any]:
  def load():
    from sklearn import datasets

    return getattr(datasets, name)()

  return load


SOURCES: Mapping[str, _Source] = {
  'sklearn:digits': _Source(_sklearn_loader('load_digits'), 'minmax', (0.0, 16.0)),
  'sklearn:breast_cancer': _Source(_sklearn_loader('load_breast_cancer'), 'standardize'),
  'sklearn:wine': _Source(_sklearn_loader('load_wine'), 'standardize'),
}
# Sources generated here rather than loaded (see synthetic_credit.py).
GENERATED_SOURCES = (synthetic_credit.SOURCE,)


@dataclasses.dataclass(frozen=True)
class GenerationParams:
  """What a bundled raw directory was generated from."""

  source: str
  raw_format: str
  num_clients: int
  partition: str
  dirichlet_alpha: float | None
  test_fraction: float
  seed: int

  def to_json(self) -> dict[str, Any]:
    out = {'generator_version': GENERATOR_VERSION, **dataclasses.asdict(self)}
    if self.source == synthetic_credit.SOURCE:
      out['source_version'] = synthetic_credit.GENERATOR_VERSION
    return out


@dataclasses.dataclass(frozen=True)
class BundledDataset:
  """What `write_bundled_dataset` wrote (or found already written).

  Attributes:
    raw_dir: The directory.
    train_file: Path of the training rows.
    test_file: Path of the held-out rows.
    feature_spec_file: Path of the feature spec.
    num_train_rows: Training rows written.
    num_test_rows: Test rows written.
    num_clients: Client keys used.
    reused: True if the directory already held data for the same parameters.
    central_feature_spec_file: Path of the feature spec completed from the
      pooled training rows (synthetic sources only), else None.
  """

  raw_dir: str
  train_file: str
  test_file: str
  feature_spec_file: str
  num_train_rows: int
  num_test_rows: int
  num_clients: int
  reused: bool = False
  central_feature_spec_file: str | None = None


def client_keys(num_clients: int) -> list[str]:
  """The client keys `user_0000`, `user_0001`, ... (at least 4 digits)."""
  width = max(4, len(str(num_clients - 1)))
  return [f'user_{i:0{width}d}' for i in range(num_clients)]


def sanitize_column_name(name: str) -> str:
  """Maps a feature name to [A-Za-z0-9_] (runs of other characters become `_`)."""
  out = re.sub(r'[^A-Za-z0-9_]+', '_', name.strip()).strip('_')
  if not out or out[0].isdigit():
    out = 'f_' + out
  return out


def partition_iid(num_rows: int, num_clients: int, rng: np.random.Generator) -> np.ndarray:
  """Assigns rows to clients IID: shuffle, then split into near-equal parts.

  Args:
    num_rows: Number of rows.
    num_clients: Number of clients, 1 <= num_clients <= num_rows.
    rng: The random generator.

  Returns:
    An int array of length `num_rows`: each row's client index. Every client
    gets `num_rows // num_clients` or one more rows.
  """
  _check_clients(num_rows, num_clients)
  order = rng.permutation(num_rows)
  assignment = np.empty(num_rows, dtype=np.int64)
  for client, part in enumerate(np.array_split(order, num_clients)):
    assignment[part] = client
  return assignment


def partition_dirichlet(
  labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
  """Assigns rows to clients with Dirichlet label skew.

  For each class, the class's rows (shuffled) are divided among the clients
  in proportions drawn from Dir(alpha, ..., alpha): the smaller `alpha`, the
  fewer classes each client holds. A client left with no row then takes one
  from the currently largest client, so every client has at least one row.

  Args:
    labels: Integer class label of each row.
    num_clients: Number of clients, 1 <= num_clients <= len(labels).
    alpha: Dirichlet concentration, > 0.
    rng: The random generator.

  Returns:
    An int array of length `len(labels)`: each row's client index.

  Raises:
    BundledDataError: If `alpha` <= 0 or there are more clients than rows.
  """
  labels = np.asarray(labels)
  _check_clients(len(labels), num_clients)
  if not alpha > 0:
    raise BundledDataError(
      f'dirichlet_alpha must be > 0 (config: data.dirichlet_alpha), got {alpha}.'
    )
  assignment = np.empty(len(labels), dtype=np.int64)
  for label in np.unique(labels):
    rows = rng.permutation(np.flatnonzero(labels == label))
    proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
    cuts = (np.cumsum(proportions)[:-1] * len(rows)).astype(np.int64)
    for client, part in enumerate(np.split(rows, cuts)):
      assignment[part] = client
  counts = np.bincount(assignment, minlength=num_clients)
  for client in np.flatnonzero(counts == 0):
    donor = int(np.argmax(counts))
    row = int(rng.choice(np.flatnonzero(assignment == donor)))
    assignment[row] = client
    counts[donor] -= 1
    counts[client] += 1
  return assignment


def stratified_test_split(
  labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> np.ndarray:
  """Returns a boolean mask of the test rows: `test_fraction` of each class, rounded."""
  labels = np.asarray(labels)
  is_test = np.zeros(len(labels), dtype=bool)
  for label in np.unique(labels):
    rows = rng.permutation(np.flatnonzero(labels == label))
    is_test[rows[: int(round(test_fraction * len(rows)))]] = True
  return is_test


def make_feature_spec(
  source: str, columns: Sequence[str], train_x: np.ndarray, num_classes: int
) -> feature_spec_lib.FeatureSpec:
  """The feature spec of a bundled source: known bounds, or train-split mean/std."""
  info = SOURCES[source]
  features = []
  for j, name in enumerate(columns):
    if info.scaling == 'minmax':
      low, high = info.value_range
      features.append(feature_spec_lib.FeatureColumn(name=name, min=low, max=high))
    else:
      std = float(np.std(train_x[:, j]))
      features.append(
        feature_spec_lib.FeatureColumn(
          name=name, mean=float(np.mean(train_x[:, j])), std=std if std > 0 else 1.0
        )
      )
  return feature_spec_lib.FeatureSpec(
    client_key=CLIENT_KEY_COLUMN,
    label=feature_spec_lib.LabelSpec(name=LABEL_COLUMN, num_classes=num_classes),
    features=tuple(features),
  )


def read_generation_params(raw_dir: str) -> dict[str, Any] | None:
  """The parameters `raw_dir` was generated for, or None if it has none (or unreadable)."""
  try:
    with open(os.path.join(raw_dir, GENERATION_FILENAME), encoding='utf-8') as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None
  return data if isinstance(data, dict) else None


def write_bundled_dataset(
  *,
  source: str,
  raw_dir: str,
  raw_format: str = 'csv',
  num_clients: int,
  partition: str = 'iid',
  dirichlet_alpha: float = 0.5,
  test_fraction: float = 0.2,
  seed: int = 0,
  overwrite: bool = False,
) -> BundledDataset:
  """Writes a bundled dataset as per-client raw rows plus its feature spec.

  The files are written into a temporary sibling directory which then
  replaces `raw_dir`, so a failure leaves no half-written directory. If
  `raw_dir` already holds data generated for the same parameters, nothing is
  written unless `overwrite`.

  Args:
    source: One of `SOURCES` or `GENERATED_SOURCES` (config: data.source).
    raw_dir: Output directory (config: data.raw_dir).
    raw_format: 'csv' or 'jsonl'.
    num_clients: Number of client keys, 1 <= num_clients <= training rows
      (the number of users of a generated source).
    partition: 'iid' or 'dirichlet' ('iid' only for a generated source, whose
      rows belong to their users).
    dirichlet_alpha: Concentration of the Dirichlet label skew, > 0.
    test_fraction: Fraction of each class held out as test rows, in (0, 1).
    seed: Seed of the split, the partition and the test assignment.
    overwrite: Regenerate even if `raw_dir` holds data for these parameters,
      and replace a `raw_dir` this function did not write.

  Returns:
    What was written (or found).

  Raises:
    BundledDataError: If a parameter is invalid (naming its config field), or
      `raw_dir` exists, is not empty and was not written by this function
      (unless `overwrite`).
  """
  params = _check_params(
    source=source,
    raw_format=raw_format,
    num_clients=num_clients,
    partition=partition,
    dirichlet_alpha=dirichlet_alpha,
    test_fraction=test_fraction,
    seed=seed,
  )
  train_name, test_name = f'train.{raw_format}', f'test.{raw_format}'
  names = [train_name, test_name, FEATURE_SPEC_FILENAME]
  generated = source in GENERATED_SOURCES
  if generated:
    names.append(synthetic_credit.CENTRAL_FEATURE_SPEC_FILENAME)
  paths = {name: os.path.join(raw_dir, name) for name in names}
  central = paths.get(synthetic_credit.CENTRAL_FEATURE_SPEC_FILENAME)

  existing = read_generation_params(raw_dir)
  if existing is not None and not overwrite and existing.get('params') == params.to_json():
    if all(os.path.exists(p) for p in paths.values()):
      return BundledDataset(
        raw_dir,
        paths[train_name],
        paths[test_name],
        paths[FEATURE_SPEC_FILENAME],
        existing.get('num_train_rows', -1),
        existing.get('num_test_rows', -1),
        num_clients,
        reused=True,
        central_feature_spec_file=central,
      )
  if os.path.isdir(raw_dir) and os.listdir(raw_dir) and existing is None and not overwrite:
    raise BundledDataError(
      f'{raw_dir!r} exists and holds files that make_data did not write (no '
      f'{GENERATION_FILENAME}); choose another data.raw_dir, or pass --overwrite to '
      'replace it.'
    )
  if generated:
    num_train, num_test = _write_synthetic_credit(
      raw_dir, params, train_name=train_name, test_name=test_name
    )
    return BundledDataset(
      raw_dir,
      paths[train_name],
      paths[test_name],
      paths[FEATURE_SPEC_FILENAME],
      num_train,
      num_test,
      num_clients,
      central_feature_spec_file=central,
    )

  dataset = SOURCES[source].load()
  x = np.asarray(dataset.data, dtype=np.float64)
  y = np.asarray(dataset.target, dtype=np.int64)
  num_classes = int(y.max()) + 1
  columns = [sanitize_column_name(n) for n in dataset.feature_names]
  if len(set(columns)) != len(columns) or {CLIENT_KEY_COLUMN, LABEL_COLUMN} & set(columns):
    raise BundledDataError(f'{source}: sanitized feature names collide: {columns}')

  rng = np.random.default_rng(seed)
  is_test = stratified_test_split(y, test_fraction, rng)
  train_rows, test_rows = np.flatnonzero(~is_test), np.flatnonzero(is_test)
  if num_clients > len(train_rows):
    raise BundledDataError(
      f'data.num_clients={num_clients} exceeds the {len(train_rows)} training rows of '
      f'{source}; lower data.num_clients (or data.test_fraction).'
    )
  if partition == 'iid':
    train_clients = partition_iid(len(train_rows), num_clients, rng)
  else:
    train_clients = partition_dirichlet(y[train_rows], num_clients, dirichlet_alpha, rng)
  test_clients = rng.integers(0, num_clients, size=len(test_rows))
  keys = client_keys(num_clients)
  spec = make_feature_spec(source, columns, x[train_rows], num_classes)

  parent = os.path.dirname(os.path.abspath(raw_dir))
  os.makedirs(parent, exist_ok=True)
  tmp_dir = f'{os.path.abspath(raw_dir)}.tmp-{os.getpid()}'
  shutil.rmtree(tmp_dir, ignore_errors=True)
  os.makedirs(tmp_dir)
  try:
    # Rows in a random order, so each client's rows are spread over the file.
    train_order = rng.permutation(len(train_rows))
    _write_rows(
      os.path.join(tmp_dir, train_name),
      raw_format,
      columns,
      [(keys[train_clients[i]], y[train_rows[i]], x[train_rows[i]]) for i in train_order],
    )
    _write_rows(
      os.path.join(tmp_dir, test_name),
      raw_format,
      columns,
      [(keys[c], y[r], x[r]) for r, c in zip(test_rows, test_clients)],
    )
    spec.save(os.path.join(tmp_dir, FEATURE_SPEC_FILENAME))
    with open(os.path.join(tmp_dir, GENERATION_FILENAME), 'w', encoding='utf-8') as f:
      json.dump(
        {
          'params': params.to_json(),
          'num_train_rows': int(len(train_rows)),
          'num_test_rows': int(len(test_rows)),
        },
        f,
        indent=2,
      )
      f.write('\n')
    atomic_files.replace_directory(tmp_dir, raw_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  return BundledDataset(
    raw_dir,
    paths[train_name],
    paths[test_name],
    paths[FEATURE_SPEC_FILENAME],
    int(len(train_rows)),
    int(len(test_rows)),
    num_clients,
  )


def _write_synthetic_credit(
  raw_dir: str, params: GenerationParams, *, train_name: str, test_name: str
) -> tuple[int, int]:
  """Generates and writes the synthetic_credit files; returns (training rows, test rows)."""
  population_rng, split_rng = synthetic_credit.random_generators(params.seed)
  try:
    rows = synthetic_credit.generate(params.num_clients, population_rng)
  except synthetic_credit.SyntheticCreditError as e:
    raise BundledDataError(str(e)) from e
  is_test = stratified_test_split(rows.label, params.test_fraction, split_rng)
  is_test = synthetic_credit.keep_a_training_row(is_test, rows.user)
  # Rows in a random order, so each client's rows are spread over the file.
  train = rows.take(split_rng.permutation(np.flatnonzero(~is_test)))
  test = rows.take(split_rng.permutation(np.flatnonzero(is_test)))
  keys = client_keys(params.num_clients)

  parent = os.path.dirname(os.path.abspath(raw_dir))
  os.makedirs(parent, exist_ok=True)
  tmp_dir = f'{os.path.abspath(raw_dir)}.tmp-{os.getpid()}'
  shutil.rmtree(tmp_dir, ignore_errors=True)
  os.makedirs(tmp_dir)
  try:
    synthetic_credit.write_rows(os.path.join(tmp_dir, train_name), params.raw_format, train, keys)
    synthetic_credit.write_rows(os.path.join(tmp_dir, test_name), params.raw_format, test, keys)
    synthetic_credit.write_json(
      os.path.join(tmp_dir, FEATURE_SPEC_FILENAME), synthetic_credit.draft_feature_spec()
    )
    synthetic_credit.write_json(
      os.path.join(tmp_dir, synthetic_credit.CENTRAL_FEATURE_SPEC_FILENAME),
      synthetic_credit.central_feature_spec(train),
    )
    synthetic_credit.write_json(
      os.path.join(tmp_dir, GENERATION_FILENAME),
      {
        'params': params.to_json(),
        'num_train_rows': len(train),
        'num_test_rows': len(test),
      },
    )
    atomic_files.replace_directory(tmp_dir, raw_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  return len(train), len(test)


def _check_params(
  *, source, raw_format, num_clients, partition, dirichlet_alpha, test_fraction, seed
) -> GenerationParams:
  if source not in SOURCES and source not in GENERATED_SOURCES:
    raise BundledDataError(
      f'data.source={source!r} is not a bundled dataset; use one of '
      f"{sorted([*SOURCES, *GENERATED_SOURCES])} (or 'none' for your own data)."
    )
  if source in GENERATED_SOURCES and partition != 'iid':
    raise BundledDataError(
      f'data.partition={partition!r} does not apply to data.source={source!r}: its rows '
      "belong to the users that generated them; set data.partition='iid'."
    )
  if raw_format not in RAW_FORMATS:
    raise BundledDataError(f'data.raw_format={raw_format!r} must be one of {RAW_FORMATS}.')
  if partition not in PARTITIONS:
    raise BundledDataError(f'data.partition={partition!r} must be one of {PARTITIONS}.')
  if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
    raise BundledDataError(f'data.num_clients must be an integer >= 1, got {num_clients!r}.')
  if not 0 < test_fraction < 1:
    raise BundledDataError(f'data.test_fraction must be in (0, 1), got {test_fraction!r}.')
  if partition == 'dirichlet' and not (dirichlet_alpha is not None and dirichlet_alpha > 0):
    raise BundledDataError(f'data.dirichlet_alpha must be > 0, got {dirichlet_alpha!r}.')
  return GenerationParams(
    source=source,
    raw_format=raw_format,
    num_clients=int(num_clients),
    partition=partition,
    dirichlet_alpha=float(dirichlet_alpha) if partition == 'dirichlet' else None,
    test_fraction=float(test_fraction),
    seed=int(seed),
  )


def _check_clients(num_rows: int, num_clients: int) -> None:
  if not 1 <= num_clients <= num_rows:
    raise BundledDataError(
      f'num_clients={num_clients} must be in [1, {num_rows}] (the number of rows); '
      'change data.num_clients.'
    )


def _format_value(value: float) -> str:
  value = float(value)
  return str(int(value)) if value.is_integer() else repr(value)


def _write_rows(
  path: str, raw_format: str, columns: Sequence[str], rows: Sequence[tuple[str, int, np.ndarray]]
) -> None:
  with open(path, 'w', encoding='utf-8', newline='') as f:
    if raw_format == 'csv':
      writer = csv.writer(f, lineterminator='\n')
      writer.writerow([CLIENT_KEY_COLUMN, LABEL_COLUMN, *columns])
      for key, label, values in rows:
        writer.writerow([key, int(label), *(_format_value(v) for v in values)])
    else:
      for key, label, values in rows:
        record = {CLIENT_KEY_COLUMN: key, LABEL_COLUMN: int(label)}
        record.update((c, float(v)) for c, v in zip(columns, values))
        f.write(json.dumps(record) + '\n')
