"""Client data from in-memory arrays, in the layout the preprocessing pipeline writes.

The Beam pipeline (`fedpipe-preprocess`) turns a data owner's raw CSV/JSONL
files into a client-data directory. Data that is already arrays (a NumPy
experiment, a simulation, a partition made in a notebook) can skip it:
`write_client_data` writes the same directory

    manifest.json
    clients.sqlite                 every client's records (`client_store`)

with the same records (`tf.train.Example`s: `x` a float list of
`num_features` values, `y` one label (int64, float32 for regression) and,
with weights, `w` one float32; see `fedpipe.data.manifest`), so
training, a silo server (`fedpipe-silo --data_dir=...`) and the readers in
`fedpipe.computations.client_data` take it as they take the pipeline's.
With `storage='tfrecord_per_client'` it writes the older layout instead,
`train/<client_id>.tfrecord` and `eval/<client_id>.tfrecord`, one file per
client (for readers of that layout; both give the same batches).

For 100,000 clients of 10 examples, the rows go into SQLite in one
transaction (`client_store.write_store`), in key order, so the file is
written sequentially.

The values are written as given: the pipeline's feature-spec validation and
normalization are not applied, so normalize `x` beforehand. Like this whole
layer it does not import TensorFlow (see `fedpipe.data.example_records`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sqlite3
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from fedpipe.data import atomic_files, client_store, example_records, record_schema
from fedpipe.data import manifest as manifest_lib
from fedpipe.errors import FedpipeError

# The feature spec written when none is given: the columns the records came from.
DEFAULT_CLIENT_KEY = 'client_id'
DEFAULT_LABEL_NAME = 'y'
DEFAULT_FEATURE_PREFIX = 'x'
WRITER_NAME = 'fedpipe.write_client_data'


class ClientDataError(FedpipeError, ValueError):
  """The arrays, client ids, labels or feature spec given to `write_client_data` are unusable."""


class ClientDataDirError(FedpipeError, OSError):
  """The output directory of `write_client_data` cannot be written or is not ours to replace."""


@dataclasses.dataclass(frozen=True)
class _Client:
  """One client's validated records."""

  x: np.ndarray  # float32 [n, num_features]
  y: np.ndarray  # int64 [n] (float64 [n] for regression)
  w: np.ndarray | None = None  # float32 [n], the example weights, or None


def write_client_data(
  output_dir: str | os.PathLike[str],
  train: Mapping[str, tuple[ArrayLike, ArrayLike]],
  eval: Mapping[str, tuple[ArrayLike, ArrayLike]] | None = None,
  *,
  num_classes: int | None = None,
  feature_spec: Mapping[str, Any] | None = None,
  storage: str = manifest_lib.STORAGE_SQLITE,
  label_task: str | None = None,
) -> manifest_lib.Manifest:
  """Writes per-client arrays as a client-data directory, exactly as preprocessing does.

  Everything is validated before anything is written. The directory is
  built next to `output_dir` and renamed into place once complete (manifest
  last), so a reader sees the old directory or the new one, never a part.
  An existing client-data directory (one with a `manifest.json`) at
  `output_dir` is replaced, as the preprocessing pipeline replaces its
  output; any other non-empty directory is refused.

  Args:
    output_dir: The client-data directory to create or replace (a local path);
      the value of `config.data.processed_dir` or a silo's `--data_dir`.
    train: Client id -> `(x, y)` of the training split: `x` array-like of
      shape `[n, num_features]` (finite floats, written as float32), `y` of
      shape `[n]` (integer class labels), `n >= 1`. Client ids are file names
      (`manifest.CLIENT_ID_PATTERN`: letters, digits, `_.-`, up to 128).
      A client may give `(x, y, w)` instead, `w` its `[n]` example weights
      (finite, >= 0); then every client does, and the records carry `w`.
    eval: The evaluation split in the same form, or None for none (training
      with `fedpipe.train` or `fedpipe-train` evaluates on it, and needs it).
      Its clients may differ from the training clients.
    num_classes: The number of classes (labels lie in `[0, num_classes)`);
      default: the feature spec's `label.num_classes`, else the largest label
      + 1.
    feature_spec: The feature spec recorded in the manifest (the JSON form
      of `fedpipe.pipelines.feature_spec.FeatureSpec`); default: features
      named `x0`, `x1`, ... and label `y`. Silos of one federation must
      record the same spec.
    storage: The layout, `manifest.STORAGE_SQLITE` (one `clients.sqlite`,
      the default, what preprocessing writes) or
      `manifest.STORAGE_TFRECORD_PER_CLIENT` (one TFRecord file per client,
      the older layout); recorded in the manifest, which the readers follow.
    label_task: 'multiclass' (integer classes), 'binary' (labels 0/1) or
      'regression' (finite float labels); default: the feature spec's
      `label.task`, else 'multiclass'.

  Returns:
    The manifest written to `<output_dir>/manifest.json`.

  Raises:
    ClientDataError: If a client id is invalid, a client's arrays have the
      wrong shape or type, hold NaN or infinite values or labels out of
      range, clients disagree on the number of features, a split is empty,
      or the feature spec disagrees with the data, or the storage is
      unknown; the message names the split and client.
    ClientDataDirError: If `output_dir` is a file, a non-empty directory
      that is not client data, or cannot be written.

  Example:

    >>> import numpy as np
    >>> from fedpipe.data.client_data_writer import write_client_data
    >>> rng = np.random.default_rng(0)
    >>> clients = {f'user{i}': (rng.normal(size=(20, 4)), rng.integers(0, 3, 20))
    ...            for i in range(5)}
    >>> manifest = write_client_data('data/mine', clients, num_classes=3)
    >>> manifest.split('train').num_examples
    100
  """
  output_dir = _output_path(output_dir)
  if storage not in manifest_lib.STORAGES:
    raise ClientDataError(
      f'storage must be one of {manifest_lib.STORAGES}, got {storage!r}; leave it out for '
      f'{manifest_lib.STORAGE_SQLITE!r}.'
    )
  label_task = _label_task(label_task, feature_spec)
  regression = label_task == record_schema.REGRESSION
  splits = {manifest_lib.TRAIN_SPLIT: _validate_split(manifest_lib.TRAIN_SPLIT, train, regression)}
  if eval is not None:
    splits[manifest_lib.EVAL_SPLIT] = _validate_split(manifest_lib.EVAL_SPLIT, eval, regression)
  num_features = _num_features(splits)
  weighted = _weighted(splits, feature_spec)
  if label_task == record_schema.MULTICLASS:
    spec_classes = _spec_num_classes(feature_spec)
    num_classes = _num_classes(splits, num_classes, spec_classes)
  else:
    num_classes = _task_num_classes(splits, label_task, num_classes)
  spec = _feature_spec(feature_spec, num_features, num_classes, label_task, weighted)
  manifest = manifest_lib.Manifest(
    feature_spec=spec,
    splits={
      split: manifest_lib.SplitManifest(clients={c: len(d.y) for c, d in sorted(clients.items())})
      for split, clients in splits.items()
    },
    num_features=num_features,
    num_classes=num_classes,
    dead_letter={'files': {}, 'total': 0, 'by_reason': {}, 'by_split': {s: {} for s in splits}},
    extra={'written_by': WRITER_NAME},
    storage=storage,
    label_task=label_task,
    weighted=weighted,
  )
  _check_output_dir(output_dir)
  _write_atomically(output_dir, splits, manifest)
  return manifest


def _output_path(output_dir: Any) -> str:
  if not isinstance(output_dir, str | os.PathLike):
    raise ClientDataDirError(
      f'output_dir must be a path (str or os.PathLike), got {type(output_dir).__name__}.'
    )
  path = os.fspath(output_dir)
  if '://' in path:
    raise ClientDataDirError(
      f'output_dir={path!r}: write_client_data writes local directories only; write '
      'locally and copy, or run fedpipe-preprocess, which writes to any Beam filesystem.'
    )
  if not path.strip():
    raise ClientDataDirError('output_dir is empty; give the client-data directory to write.')
  # Through symlinks: the directory a link points to is the one replaced.
  return os.path.realpath(path).rstrip(os.sep) or os.sep


def _validate_split(split: str, clients: Any, regression: bool = False) -> dict[str, _Client]:
  if not isinstance(clients, Mapping):
    raise ClientDataError(
      f'{split} split: expected a mapping client id -> (x, y), got {type(clients).__name__}.'
    )
  if not clients:
    raise ClientDataError(
      f'{split} split has no clients; give at least one client id -> (x, y)'
      + (', or eval=None for no eval split.' if split == manifest_lib.EVAL_SPLIT else '.')
    )
  return {
    client_id: _validate_client(split, client_id, data, regression)
    for client_id, data in clients.items()
  }


def _validate_client(split: str, client_id: Any, data: Any, regression: bool = False) -> _Client:
  if not isinstance(client_id, str) or not manifest_lib.is_valid_client_id(client_id):
    raise ClientDataError(
      f'{split} split: client id {client_id!r} is not a valid client id: ids are file names '
      f'matching {manifest_lib.CLIENT_ID_PATTERN} (letters, digits, "_", "." and "-", not '
      'starting with "." or "-", at most 128 characters); rename the client, e.g. with '
      'fedpipe.data.client_ids.client_id_for_key.'
    )
  where = f'{split} split, client {client_id!r}'
  if not isinstance(data, tuple | list) or len(data) not in (2, 3):
    raise ClientDataError(
      f'{where}: expected a pair (x, y) or a triple (x, y, w), got {type(data).__name__}.'
    )
  x_in, y_in = data[:2]
  try:
    x = np.asarray(x_in)
    # float32 needs no range check; anything else is checked as float64 first.
    if x.dtype != np.float32:
      x = np.asarray(x, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ClientDataError(
      f'{where}: x is not a numeric array of shape [n, num_features] ({e}).'
    ) from e
  if x.ndim != 2:
    raise ClientDataError(
      f'{where}: x has shape {x.shape}; it must be 2-D, [n, num_features] (one row per '
      'example; reshape a single feature with x.reshape(-1, 1)).'
    )
  n, width = x.shape
  if n == 0 or width == 0:
    raise ClientDataError(
      f'{where}: x has shape {x.shape}; a client needs at least one example and one feature.'
    )
  try:
    y = np.asarray(y_in)
  except (TypeError, ValueError) as e:
    raise ClientDataError(f'{where}: y is not an array of integer labels ({e}).') from e
  if y.ndim != 1 or len(y) != n:
    raise ClientDataError(
      f'{where}: y has shape {y.shape}; it must be 1-D with one label per row of x, shape ({n},).'
    )
  if regression:
    if y.dtype.kind not in 'iuf' or not np.isfinite(y).all():
      raise ClientDataError(
        f'{where}: y must hold finite numbers (regression labels), got dtype {y.dtype}'
        + (' with NaN or infinite values' if y.dtype.kind == 'f' else '')
        + '.'
      )
  elif y.dtype.kind == 'b':
    y = y.astype(np.int64)
  elif y.dtype.kind not in 'iu':
    raise ClientDataError(
      f'{where}: y has dtype {y.dtype}; labels must be integers (class indices); convert '
      'them, e.g. y.astype(int) for whole-number floats.'
    )
  # One reduction on the common path; the rows are found only for the message.
  if not np.isfinite(x).all():
    bad_rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
    raise ClientDataError(
      f'{where}: x holds NaN or infinite values in {len(bad_rows)} row(s) (first: row '
      f'{bad_rows[0]}); drop or impute them first.'
    )
  limit = np.finfo(np.float32).max
  if x.dtype != np.float32 and (x.max() > limit or x.min() < -limit):
    bad_rows = np.flatnonzero((np.abs(x) > limit).any(axis=1))
    raise ClientDataError(
      f'{where}: x holds values beyond float32 range in {len(bad_rows)} row(s) (first: row '
      f'{bad_rows[0]}); records store float32, so scale the features.'
    )
  w = None
  if len(data) == 3:
    try:
      w = np.asarray(data[2], dtype=np.float64)
    except (TypeError, ValueError) as e:
      raise ClientDataError(f'{where}: w is not an array of example weights ({e}).') from e
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any():
      raise ClientDataError(
        f'{where}: w must be finite example weights >= 0, one per row of x, shape ({n},); '
        f'got shape {w.shape}.'
      )
    w = w.astype(np.float32)
  return _Client(
    x=x.astype(np.float32, copy=False),
    y=y.astype(np.float64 if regression else np.int64, copy=False),
    w=w,
  )


def _label_task(given: Any, feature_spec: Any) -> str:
  label = feature_spec.get('label') if isinstance(feature_spec, Mapping) else None
  from_spec = label.get('task') if isinstance(label, Mapping) else None
  if given is not None and from_spec is not None and given != from_spec:
    raise ClientDataError(
      f'label_task={given!r} but feature_spec "label.task" is {from_spec!r}; make them agree '
      'or leave label_task out.'
    )
  task = given if given is not None else from_spec or record_schema.MULTICLASS
  if task not in record_schema.LABEL_TASKS:
    raise ClientDataError(f'label_task must be one of {record_schema.LABEL_TASKS}, got {task!r}.')
  return task


def _weighted(splits: Mapping[str, Mapping[str, _Client]], feature_spec: Any) -> bool:
  kinds = {
    (split, c): d.w is not None for split, clients in splits.items() for c, d in clients.items()
  }
  weighted = any(kinds.values())
  if weighted and not all(kinds.values()):
    split, client_id = next(k for k, v in kinds.items() if not v)
    raise ClientDataError(
      f'{split} split, client {client_id!r}: gives (x, y) but other clients give weights '
      '(x, y, w); give weights for every client or for none.'
    )
  spec_weight = isinstance(feature_spec, Mapping) and feature_spec.get('weight') is not None
  if spec_weight and not weighted:
    raise ClientDataError(
      'feature_spec has a "weight" column but no client gives weights; give (x, y, w) per '
      'client or remove "weight" from the spec.'
    )
  return weighted


def _task_num_classes(
  splits: Mapping[str, Mapping[str, _Client]], label_task: str, given: Any
) -> int:
  """2 for 'binary' (labels checked to be 0/1), 0 for 'regression'."""
  expected = 2 if label_task == record_schema.BINARY else 0
  if given is not None and given != expected:
    raise ClientDataError(
      f'num_classes={given!r} does not fit label_task {label_task!r}; leave num_classes out.'
    )
  if label_task == record_schema.BINARY:
    for split, clients in splits.items():
      for client_id, data in clients.items():
        bad = np.flatnonzero((data.y != 0) & (data.y != 1))
        if len(bad):
          raise ClientDataError(
            f'{split} split, client {client_id!r}: label {data.y[bad[0]]} (row {bad[0]}) is '
            'not 0 or 1; binary labels are 0 or 1.'
          )
  return expected


def _num_features(splits: Mapping[str, Mapping[str, _Client]]) -> int:
  first: tuple[str, str, int] | None = None
  for split, clients in splits.items():
    for client_id, data in clients.items():
      width = data.x.shape[1]
      if first is None:
        first = (split, client_id, width)
      elif width != first[2]:
        raise ClientDataError(
          f'{split} split, client {client_id!r}: x has {width} features, but {first[0]} split, '
          f'client {first[1]!r} has {first[2]}; every client of every split needs the same '
          'features, in the same order.'
        )
  assert first is not None  # _validate_split refuses empty splits.
  return first[2]


def _spec_num_classes(feature_spec: Any) -> int | None:
  if feature_spec is None:
    return None
  if not isinstance(feature_spec, Mapping):
    raise ClientDataError(
      f'feature_spec must be a mapping (the JSON form of a feature spec), got '
      f'{type(feature_spec).__name__}.'
    )
  label = feature_spec.get('label')
  if isinstance(label, Mapping) and 'num_classes' in label:
    value = label['num_classes']
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
      raise ClientDataError(
        f'feature_spec: "label.num_classes" must be an integer >= 2, got {value!r}.'
      )
    return value
  return None


def _num_classes(
  splits: Mapping[str, Mapping[str, _Client]], given: Any, from_spec: int | None
) -> int:
  if given is not None:
    if isinstance(given, bool) or not isinstance(given, int | np.integer) or given < 2:
      raise ClientDataError(f'num_classes must be an integer >= 2, got {given!r}.')
    given = int(given)
    if from_spec is not None and from_spec != given:
      raise ClientDataError(
        f'num_classes={given} but feature_spec "label.num_classes" is {from_spec}; '
        'make them agree or leave num_classes out.'
      )
  limit = given if given is not None else from_spec
  largest: tuple[int, str, str] | None = None
  for split, clients in splits.items():
    for client_id, data in clients.items():
      low, high = int(data.y.min()), int(data.y.max())
      if low < 0 or (limit is not None and high >= limit):
        bad = low if low < 0 else high
        row = int(np.flatnonzero(data.y == bad)[0])
        allowed = f'[0, {limit})' if limit is not None else '>= 0'
        source = 'num_classes' if given is not None else 'feature_spec "label.num_classes"'
        raise ClientDataError(
          f'{split} split, client {client_id!r}: label {bad} (row {row}) is not a class '
          f'index {allowed}'
          + (f' ({source}={limit}); ' if limit is not None else '; ')
          + 'labels are class indices 0..num_classes-1.'
        )
      if largest is None or high > largest[0]:
        largest = (high, split, client_id)
  if limit is not None:
    return limit
  assert largest is not None
  if largest[0] < 1:
    raise ClientDataError(
      'every label is 0, so the number of classes cannot be inferred; pass num_classes=.'
    )
  return largest[0] + 1


def _feature_spec(
  given: Mapping[str, Any] | None,
  num_features: int,
  num_classes: int,
  label_task: str = record_schema.MULTICLASS,
  weighted: bool = False,
) -> dict:
  if given is None:
    features = [{'name': f'{DEFAULT_FEATURE_PREFIX}{i}'} for i in range(num_features)]
    if label_task == record_schema.MULTICLASS and not weighted:
      return {
        'schema_version': 1,
        'client_key': DEFAULT_CLIENT_KEY,
        'label': {'name': DEFAULT_LABEL_NAME, 'num_classes': num_classes},
        'features': features,
      }
    label: dict[str, Any] = {'name': DEFAULT_LABEL_NAME, 'task': label_task}
    if label_task == record_schema.MULTICLASS:
      label['num_classes'] = num_classes
    spec: dict[str, Any] = {'schema_version': 2, 'client_key': DEFAULT_CLIENT_KEY, 'label': label}
    if weighted:
      spec['weight'] = {'name': record_schema.WEIGHT.key}
    spec['features'] = features
    return spec
  features = given.get('features')
  if features is not None:
    if not isinstance(features, list | tuple):
      raise ClientDataError(
        f'feature_spec: "features" must be a list of feature objects, got '
        f'{type(features).__name__}.'
      )
    width = sum(_feature_width(f) for f in features)
    if width != num_features:
      wide = f' ({width} columns of x)' if width != len(features) else ''
      raise ClientDataError(
        f'feature_spec lists {len(features)} features{wide} but x has {num_features} columns; '
        'give one feature per column of x (a one-hot slice, vocabulary size + 1 wide, per '
        'categorical feature), in order.'
      )
  spec = dict(given)
  try:
    # Through JSON: the manifest holds what a reader gets back.
    return json.loads(json.dumps(spec))
  except (TypeError, ValueError) as e:
    raise ClientDataError(f'feature_spec is not JSON-serializable: {e}.') from e


def _feature_width(feature: Any) -> int:
  """How many columns of x a feature of the spec's JSON form takes."""
  if isinstance(feature, Mapping) and feature.get('type') == 'categorical':
    vocabulary = feature.get('vocabulary')
    if not isinstance(vocabulary, list | tuple):
      raise ClientDataError(
        f'feature_spec: categorical feature {feature.get("name")!r} has no vocabulary; list it '
        '(x holds its one-hot slice, vocabulary size + 1 wide).'
      )
    return len(vocabulary) + 1
  return 1


def _check_output_dir(output_dir: str) -> None:
  if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
    raise ClientDataDirError(
      f'output_dir={output_dir!r} exists and is not a directory; choose a directory path.'
    )
  if not os.path.isdir(output_dir):
    return
  try:
    entries = os.listdir(output_dir)
  except OSError as e:
    raise ClientDataDirError(f'cannot list output_dir={output_dir!r}: {e.strerror}') from e
  if entries and manifest_lib.MANIFEST_FILENAME not in entries:
    raise ClientDataDirError(
      f'output_dir={output_dir!r} is not empty and is not a client-data directory (it has no '
      f'{manifest_lib.MANIFEST_FILENAME}); it would be replaced, so choose another directory '
      'or remove it.'
    )


def _serialize(data: _Client, encoder: example_records.ExampleEncoder) -> list[bytes]:
  return encoder.encode_rows(data.x, data.y, data.w)


def _rows(
  splits: Mapping[str, Mapping[str, _Client]], encoder: example_records.ExampleEncoder
) -> Iterator[client_store.Row]:
  """Every record as a `clients.sqlite` row, in key order (split, client id, seq)."""
  for split in sorted(splits):
    for client_id, data in sorted(splits[split].items()):
      for seq, record in enumerate(_serialize(data, encoder)):
        yield split, client_id, seq, record


def _write_atomically(
  output_dir: str, splits: Mapping[str, Mapping[str, _Client]], manifest: manifest_lib.Manifest
) -> None:
  """Builds the directory under a hidden name next to `output_dir`, then swaps it in."""
  parent, base = os.path.split(output_dir)
  tag = uuid.uuid4().hex[:12]
  staging = os.path.join(parent, f'.{base}.staging-{tag}')
  try:
    os.makedirs(parent, exist_ok=True)
    os.mkdir(staging)
  except OSError as e:
    raise ClientDataDirError(
      f'cannot create {staging!r} next to output_dir={output_dir!r}: {e.strerror}; check that '
      'its parent directory is writable.'
    ) from e
  done = False
  encoder = example_records.ExampleEncoder(
    label_task=manifest.label_task, weighted=manifest.weighted
  )
  try:
    if manifest.storage == manifest_lib.STORAGE_SQLITE:
      store = os.path.join(staging, manifest_lib.STORE_FILENAME)
      client_store.write_store(store, _rows(splits, encoder))
    else:
      for split, clients in splits.items():
        os.mkdir(os.path.join(staging, split))
        for client_id, data in sorted(clients.items()):
          path = os.path.join(staging, manifest_lib.client_file(split, client_id))
          example_records.write_tfrecord_file(path, _serialize(data, encoder))
    manifest_lib.write_manifest(staging, manifest)
    atomic_files.replace_directory(staging, output_dir)
    done = True
  except (OSError, sqlite3.Error) as e:
    raise ClientDataDirError(
      f'cannot write client data to output_dir={output_dir!r}: {e}; nothing was replaced.'
    ) from e
  finally:
    if not done:
      shutil.rmtree(staging, ignore_errors=True)
