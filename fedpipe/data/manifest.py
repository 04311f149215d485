"""The manifest of a preprocessed client-data directory: what exists, never what it holds.

The Beam preprocessing pipeline (and `write_client_data`) writes, under its
output directory,

    manifest.json
    clients.sqlite                 every client's records (storage 'sqlite')
    dead_letter/...                rejected raw records, with reasons

`clients.sqlite` is one SQLite table of `(split, client_id, seq, record)`
(see `client_store`). Directories written before it, whose manifest has no
`storage` field (storage 'tfrecord_per_client'), hold instead

    train/<client_id>.tfrecord     one file per training client
    eval/<client_id>.tfrecord      one file per evaluation client

and keep loading and training as they did. Either way each record is a
`tf.train.Example` in the record schema (`record_schema`): `x`,
`num_features` normalized float32 values, `y`, one label (an int64 class, or
a float32 value for the label task 'regression'), and, if the feature spec
has a weight column, `w`, one float32 example weight. The manifest's
`storage` says which layout a directory has, its `label_task` and
`record_format` what the records hold; readers take them from there
(`storage=manifest.storage`, `label_task=manifest.label_task`,
`weighted=manifest.weighted`). A manifest without `label_task` (written
before label tasks) is 'multiclass', its records `x` and `y` only.

The manifest lists client ids and example counts per split plus the feature
spec. A silo publishes it to the coordinator; it never contains records.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

from fedpipe.data import atomic_files, record_schema
from fedpipe.errors import FedpipeError

SCHEMA_VERSION = 1
MANIFEST_FILENAME = 'manifest.json'
TRAIN_SPLIT = 'train'
EVAL_SPLIT = 'eval'
SPLITS = (TRAIN_SPLIT, EVAL_SPLIT)
RECORD_EXTENSION = '.tfrecord'

# How a directory stores its clients' records (the manifest's `storage`).
STORAGE_FIELD = 'storage'
STORAGE_SQLITE = 'sqlite'
STORAGE_TFRECORD_PER_CLIENT = 'tfrecord_per_client'
STORAGES = (STORAGE_SQLITE, STORAGE_TFRECORD_PER_CLIENT)
# What a manifest without the field means: the layout written before the field existed.
LEGACY_STORAGE = STORAGE_TFRECORD_PER_CLIENT
# The label task of the records (`record_schema.LABEL_TASKS`); absent: 'multiclass'.
LABEL_TASK_FIELD = 'label_task'
# The one file of storage 'sqlite', next to manifest.json.
STORE_FILENAME = 'clients.sqlite'

# Client ids are file names at the silo: no separators, no leading dot.
CLIENT_ID_PATTERN = r'[A-Za-z0-9][A-Za-z0-9_.-]{0,127}'
_CLIENT_ID_RE = re.compile(CLIENT_ID_PATTERN)


class ManifestError(FedpipeError, ValueError):
  """A client-data directory or its manifest is missing, malformed or inconsistent."""


def is_valid_client_id(client_id: str) -> bool:
  return _CLIENT_ID_RE.fullmatch(client_id) is not None


def check_storage(storage: object, *, source: str = 'manifest') -> str:
  """Returns `storage` if it is a layout this code reads.

  Raises:
    ManifestError: Naming the field and the fix, if it is not.
  """
  if not isinstance(storage, str) or storage not in STORAGES:
    raise ManifestError(
      f'{source}: field {STORAGE_FIELD!r} is {storage!r}, a client-data layout this fedpipe '
      f'does not read (it reads {", ".join(repr(s) for s in STORAGES)}); re-run '
      'fedpipe-preprocess --config=... (or write_client_data) with this fedpipe version to '
      'rewrite the directory.'
    )
  return storage


@dataclasses.dataclass(frozen=True)
class SplitManifest:
  """The clients of one split: id -> number of examples."""

  clients: Mapping[str, int]
  excluded_clients: Mapping[str, int] = dataclasses.field(default_factory=dict)

  @property
  def num_examples(self) -> int:
    return sum(self.clients.values())

  def to_json(self) -> dict[str, Any]:
    return {
      'num_clients': len(self.clients),
      'num_examples': self.num_examples,
      'clients': dict(sorted(self.clients.items())),
      'excluded_clients': dict(sorted(self.excluded_clients.items())),
    }


@dataclasses.dataclass(frozen=True)
class Manifest:
  """What a preprocessed client-data directory holds."""

  feature_spec: Mapping[str, Any]
  splits: Mapping[str, SplitManifest]
  num_features: int
  num_classes: int
  dead_letter: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # How the records are stored: `STORAGE_SQLITE` (what writers write) or
  # `STORAGE_TFRECORD_PER_CLIENT` (a manifest without the field).
  storage: str = LEGACY_STORAGE
  # The label task (`record_schema.LABEL_TASKS`): the dtype of `y`, the model's
  # loss and metrics. `num_classes` is 2 for 'binary' and 0 for 'regression'.
  label_task: str = record_schema.MULTICLASS
  # Whether each record carries an example weight `w`.
  weighted: bool = False

  def __post_init__(self):
    check_storage(self.storage)
    if self.label_task not in record_schema.LABEL_TASKS:
      raise ManifestError(
        f'manifest: field {LABEL_TASK_FIELD!r} is {self.label_task!r}, not one of '
        f'{record_schema.LABEL_TASKS}; re-run fedpipe-preprocess --config=... with this fedpipe '
        'version to rewrite the directory.'
      )

  @property
  def record_format(self) -> dict[str, dict[str, Any]]:
    """What each record holds (`record_schema.record_format`)."""
    return record_schema.record_format(
      self.num_features, label_task=self.label_task, weighted=self.weighted
    )

  @property
  def weight_column(self) -> str | None:
    """The feature spec's weight column (records carry `w`), or None."""
    if not self.weighted:
      return None
    weight = self.feature_spec.get('weight')
    name = weight.get('name') if isinstance(weight, Mapping) else None
    return str(name) if name else record_schema.WEIGHT.key

  def split(self, name: str) -> SplitManifest:
    if name not in self.splits:
      raise ManifestError(
        f'manifest has no split {name!r} (it has {sorted(self.splits)}); '
        "re-run preprocessing with that split's input files configured."
      )
    return self.splits[name]

  def to_json(self) -> dict[str, Any]:
    return {
      'schema_version': SCHEMA_VERSION,
      'record_format': self.record_format,
      'num_features': self.num_features,
      'num_classes': self.num_classes,
      LABEL_TASK_FIELD: self.label_task,
      'feature_spec': dict(self.feature_spec),
      'splits': {k: v.to_json() for k, v in sorted(self.splits.items())},
      'dead_letter': dict(self.dead_letter),
      STORAGE_FIELD: self.storage,
      **dict(self.extra),
    }

  def to_text(self) -> str:
    """The content of `manifest.json`: `to_json()` as indented JSON."""
    return atomic_files.json_text(self.to_json(), indent=2)

  @classmethod
  def from_json(cls, data: Mapping[str, Any], *, source: str = 'manifest') -> Manifest:
    """Builds a manifest from its JSON form.

    Raises:
      ManifestError: If a field is missing, of the wrong type, or the schema
        version is not this code's.
    """
    try:
      version = data['schema_version']
      if version != SCHEMA_VERSION:
        raise ManifestError(
          f'{source}: schema_version {version} is not supported (expected '
          f'{SCHEMA_VERSION}); re-run preprocessing with this fedpipe version.'
        )
      splits = {}
      for name, split in data['splits'].items():
        clients = {str(k): int(v) for k, v in split['clients'].items()}
        for client_id in clients:
          if not is_valid_client_id(client_id):
            raise ManifestError(f'{source}: invalid client id {client_id!r} in split {name!r}')
        excluded = {str(k): int(v) for k, v in split.get('excluded_clients', {}).items()}
        splits[name] = SplitManifest(clients=clients, excluded_clients=excluded)
      known = {
        'schema_version',
        'record_format',
        'num_features',
        'num_classes',
        'feature_spec',
        'splits',
        'dead_letter',
        STORAGE_FIELD,
        LABEL_TASK_FIELD,
      }
      storage = check_storage(data.get(STORAGE_FIELD, LEGACY_STORAGE), source=source)
      label_task = data.get(LABEL_TASK_FIELD, record_schema.MULTICLASS)
      if label_task not in record_schema.LABEL_TASKS:
        raise ManifestError(
          f'{source}: field {LABEL_TASK_FIELD!r} is {label_task!r}, a label task this fedpipe '
          f'does not know (it knows {", ".join(repr(t) for t in record_schema.LABEL_TASKS)}); '
          're-run fedpipe-preprocess --config=... with this fedpipe version.'
        )
      record_format = data.get('record_format') or {}
      weighted = isinstance(record_format, Mapping) and record_schema.WEIGHT.key in record_format
      return cls(
        feature_spec=dict(data['feature_spec']),
        splits=splits,
        num_features=int(data['num_features']),
        num_classes=int(data['num_classes']),
        dead_letter=dict(data.get('dead_letter', {})),
        extra={k: v for k, v in data.items() if k not in known},
        storage=storage,
        label_task=label_task,
        weighted=weighted,
      )
    except (KeyError, TypeError, AttributeError, ValueError) as e:
      if isinstance(e, ManifestError):
        raise
      raise ManifestError(f'{source}: malformed manifest ({type(e).__name__}: {e})') from e


def manifest_path(data_dir: str) -> str:
  return os.path.join(data_dir, MANIFEST_FILENAME)


def client_file(split: str, client_id: str) -> str:
  """The path of a client's records relative to the data directory (storage 'tfrecord_per_client')."""
  return f'{split}/{client_id}{RECORD_EXTENSION}'


def write_manifest(data_dir: str, manifest: Manifest) -> str:
  """Writes `manifest.json` atomically; returns its path."""
  return atomic_files.write_text(manifest_path(data_dir), manifest.to_text())


def read_manifest(data_dir: str) -> Manifest:
  """Reads and validates the manifest of a client-data directory.

  Raises:
    ManifestError: If the directory or its manifest is missing or malformed,
      its storage is not one this code reads, or (storage 'sqlite') its
      `clients.sqlite` is missing.
  """
  path = manifest_path(data_dir)
  if not os.path.isdir(data_dir):
    raise ManifestError(
      f'client-data directory {data_dir!r} does not exist; run the '
      'preprocessing pipeline first (fedpipe-preprocess --config=...).'
    )
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except FileNotFoundError as e:
    raise ManifestError(
      f'{path} not found: {data_dir!r} is not a preprocessed client-data '
      'directory; run fedpipe-preprocess --config=... first.'
    ) from e
  except (OSError, json.JSONDecodeError) as e:
    raise ManifestError(f'cannot read {path}: {e}') from e
  manifest = Manifest.from_json(data, source=path)
  if manifest.storage == STORAGE_SQLITE:
    store = os.path.join(data_dir, STORE_FILENAME)
    if not os.path.isfile(store):
      raise ManifestError(
        f'{path} says {STORAGE_FIELD} {STORAGE_SQLITE!r} but {store} is missing: the '
        'client-data directory is incomplete (copy it whole); re-run fedpipe-preprocess '
        '--config=... to rewrite it.'
      )
  return manifest
