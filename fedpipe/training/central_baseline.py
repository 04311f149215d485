"""The centralized reference: the same model trained on the pooled client data, without DP.

Federated training with DP is judged against what the data could give if it
were pooled in one place: the same Keras model, trained by `model.fit` on
every training record of every given client-data directory at once, and
evaluated on every evaluation record. It never runs in a federation (it reads
all the silos' records); benchmarks and reports use it as the baseline.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf

from fedpipe.computations import client_data, keras_model
from fedpipe.data import client_store, example_records, record_schema
from fedpipe.data import manifest as manifest_lib
from fedpipe.errors import FedpipeError


class CentralBaselineError(FedpipeError, ValueError):
  """The client-data directories cannot be pooled (different record formats), or hold no records."""


@dataclasses.dataclass(frozen=True)
class CentralResult:
  """A centrally trained model's held-out metrics.

  Attributes:
    metrics: Metric name -> value on the pooled evaluation records: `loss`
      and the label task's metrics (`accuracy`, `auc`, `mae`, `rmse`).
    train_examples: Pooled training records.
    eval_examples: Pooled evaluation records.
  """

  metrics: Mapping[str, float]
  train_examples: int
  eval_examples: int


def read_pooled_split(data_dirs: Sequence[str], split: str) -> dict[str, np.ndarray]:
  """Every record of `split` in the directories, parsed: `x`, `y` (and `w` if weighted).

  Raises:
    CentralBaselineError: If the directories' manifests disagree on the
      record format (width, label task, weights).
    manifest_lib.ManifestError: If a directory is not client data.
  """
  manifests = [manifest_lib.read_manifest(d) for d in data_dirs]
  formats = {(m.num_features, m.label_task, m.weighted) for m in manifests}
  if len(formats) != 1:
    raise CentralBaselineError(
      f'the client-data directories {list(data_dirs)} hold different record formats '
      f'(num_features, label_task, weighted): {sorted(formats)}; preprocess them with one '
      'feature spec'
    )
  num_features, label_task, weighted = formats.pop()
  records: list[bytes] = []
  for data_dir, manifest in zip(data_dirs, manifests):
    for client_id in sorted(manifest.split(split).clients):
      if manifest.storage == manifest_lib.STORAGE_SQLITE:
        path = os.path.join(data_dir, manifest_lib.STORE_FILENAME)
        records.extend(client_store.read_client(path, split, client_id))
      else:
        path = os.path.join(data_dir, split, client_id + manifest_lib.RECORD_EXTENSION)
        records.extend(example_records.read_tfrecord_file(path))
  description = client_data._feature_description(
    num_features, label_task=label_task, weighted=weighted
  )
  parsed = tf.io.parse_example(tf.constant(records, tf.string), description)
  return {key: value.numpy() for key, value in parsed.items()}


def train_central(
  data_dirs: Sequence[str],
  keras_model_builder: keras_model.KerasModelBuilder,
  *,
  epochs: int,
  batch_size: int = 32,
  learning_rate: float = 1e-3,
  seed: int = 0,
) -> CentralResult:
  """Trains the builder's model on the pooled training records, evaluates it on the pooled evaluation records.

  Args:
    data_dirs: Client-data directories (one per silo) written with one
      feature spec.
    keras_model_builder: Builds a fresh, uncompiled model, as for federated
      training (the loss and metrics follow the manifests' label task).
    epochs: Passes over the pooled training records.
    batch_size: Examples per step.
    learning_rate: Adam's learning rate.
    seed: Seeds the shuffling and the model's unseeded initializers.

  Returns:
    A `CentralResult`.

  Raises:
    CentralBaselineError: If the directories cannot be pooled or hold no
      training or evaluation records.
  """
  if not data_dirs:
    raise CentralBaselineError('no client-data directories given; pass at least one')
  label_task = manifest_lib.read_manifest(data_dirs[0]).label_task
  train = read_pooled_split(data_dirs, manifest_lib.TRAIN_SPLIT)
  evaluation = read_pooled_split(data_dirs, manifest_lib.EVAL_SPLIT)
  for name, split in (('training', train), ('evaluation', evaluation)):
    if not len(split[record_schema.LABEL.key]):
      raise CentralBaselineError(f'the directories {list(data_dirs)} hold no {name} records')
  tf.keras.utils.set_random_seed(seed)
  with keras_model.reproducible_keras_build(seed):
    model = keras_model_builder()
  loss, metrics = keras_model.loss_and_metrics(label_task, model)
  model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate), loss=loss, metrics=metrics)
  x, y = record_schema.FEATURES.key, record_schema.LABEL.key
  weights = train.get(record_schema.WEIGHT.key)
  model.fit(
    train[x], train[y], sample_weight=weights, epochs=epochs, batch_size=batch_size, verbose=0
  )
  values = model.evaluate(
    evaluation[x],
    evaluation[y],
    sample_weight=evaluation.get(record_schema.WEIGHT.key),
    batch_size=256,
    verbose=0,
    return_dict=True,
  )
  return CentralResult(
    metrics={k: float(v) for k, v in values.items()},
    train_examples=len(train[y]),
    eval_examples=len(evaluation[y]),
  )
