"""Benchmark workloads: the same examples, model and batching for every system.

`digits`: scikit-learn's digits (1,797 examples, 64 features), the 64-64-10
MLP. `synthetic`: 200,000 examples of 128 features labelled by a fixed random
teacher network, a 128-256-256-10 MLP (101,642 parameters). Clients get
near-equal shuffled shares. Their client data (fedpipe's format, one
clients.sqlite per directory, written by `fedpipe.write_client_data`; see
fedpipe/data/manifest.py) is cached under benchmarks/.cache; a cached
directory in the older one-file-per-client layout is rewritten.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from fedpipe.data import client_data_writer
from fedpipe.data import manifest as manifest_lib

CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), '.cache')
BATCH_SIZE = 16
LEARNING_RATE = 0.1


@dataclasses.dataclass(frozen=True)
class Workload:
  name: str
  x: np.ndarray
  y: np.ndarray
  hidden_units: tuple[int, ...]
  num_classes: int

  @property
  def num_features(self) -> int:
    return self.x.shape[1]


def load(name: str, *, num_examples: int = 200_000) -> Workload:
  """The named workload (deterministic)."""
  if name == 'digits':
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return Workload('digits', (x / 16.0).astype(np.float32), y.astype(np.int64), (64, 64), 10)
  if name == 'digits_train':  # The peer comparison's training split.
    x_train, _, y_train, _ = digits_split()
    return Workload('digits_train', x_train, y_train, (64, 64), 10)
  if name == 'synthetic':
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_examples, 128)).astype(np.float32)
    w1 = rng.normal(size=(128, 32)) / np.sqrt(128)
    w2 = rng.normal(size=(32, 10)) / np.sqrt(32)
    y = np.argmax(np.tanh(x @ w1) @ w2, axis=1).astype(np.int64)
    return Workload('synthetic', x, y, (256, 256), 10)
  if name == 'tiny':  # Scale benchmarks: cheap per-client work.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_examples, 16)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    return Workload('tiny', x, y, (16,), 2)
  raise ValueError(f'unknown workload {name!r}')


def digits_split():
  """Digits scaled to [0, 1], split 80/20 stratified with seed 0: (x_train, x_test, y_train, y_test)."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  x, y = load_digits(return_X_y=True)
  return train_test_split(
    (x / 16.0).astype(np.float32), y.astype(np.int64), test_size=0.2, random_state=0, stratify=y
  )


def partition(num_examples: int, num_clients: int) -> list[np.ndarray]:
  """Near-equal shuffled index shares, one per client (seeded)."""
  order = np.random.default_rng(1).permutation(num_examples)
  return np.array_split(order, num_clients)


def client_id(i: int) -> str:
  return f'c{i:05d}'


def client_data_dir(workload: Workload, num_clients: int) -> str:
  """Writes (once) the workload's clients as a client-data directory; returns the dir."""
  out = os.path.join(CACHE_DIR, f'{workload.name}-{len(workload.y)}-{num_clients}')
  path = manifest_lib.manifest_path(out)
  if (
    os.path.exists(path) and manifest_lib.read_manifest(out).storage == manifest_lib.STORAGE_SQLITE
  ):
    return out
  train = {
    client_id(i): (workload.x[idx], workload.y[idx])
    for i, idx in enumerate(partition(len(workload.y), num_clients))
  }
  client_data_writer.write_client_data(
    out, train, num_classes=workload.num_classes, feature_spec={'benchmark': workload.name}
  )
  return out


def client_data_storage(workload: Workload, num_clients: int) -> str:
  """The layout of the workload's client data (the manifest's `storage`), for the readers."""
  return manifest_lib.read_manifest(client_data_dir(workload, num_clients)).storage


def client_example_counts(workload: Workload, num_clients: int) -> list[int]:
  """Each client's training examples, in client-id order, from its data's manifest."""
  counts = (
    manifest_lib.read_manifest(client_data_dir(workload, num_clients))
    .split(manifest_lib.TRAIN_SPLIT)
    .clients
  )
  return [counts[c] for c in sorted(counts)]
