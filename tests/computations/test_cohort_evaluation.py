"""Cohort evaluation reports the per-client federated evaluation's metrics.

Both read the same held-out records where the worker runs and evaluate the
same model; the cohort process sees the users as cohorts of any size.
"""

import os

import numpy as np
import pytest

from fedpipe.computations import (
  client_data,
  cohort_data,
  cohort_evaluation,
  cohort_fedavg,
  evaluation,
  keras_model,
)
from fedpipe.data import example_records, manifest

pytestmark = pytest.mark.usefixtures('tff_worker')

NUM_FEATURES = 5
NUM_CLASSES = 3
BATCH_SIZE = 4
# Skewed, partial last batches included.
CLIENT_SIZES = {'ev-a': 1, 'ev-b': 3, 'ev-c': 4, 'ev-d': 9, 'ev-e': 30}


@pytest.fixture(scope='module')
def eval_clients(worker_dir):
  rng = np.random.default_rng(5)
  encoder = example_records.ExampleEncoder()
  for client_id, n in CLIENT_SIZES.items():
    x = rng.normal(size=(n, NUM_FEATURES)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, size=n).astype(np.int64)
    path = os.path.join(worker_dir, manifest.client_file(manifest.EVAL_SPLIT, client_id))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    example_records.write_tfrecord_file(
      path, (encoder.encode(features, label) for features, label in zip(x.tolist(), y.tolist()))
    )
  return sorted(CLIENT_SIZES)


def _builder():
  return keras_model.build_mlp(
    num_features=NUM_FEATURES, num_classes=NUM_CLASSES, hidden_units=(8,), seed=3
  )


@pytest.fixture(scope='module')
def processes():
  model_fn = keras_model.build_model_fn(_builder, num_features=NUM_FEATURES)
  data = dict(split=manifest.EVAL_SPLIT, num_features=NUM_FEATURES, batch_size=BATCH_SIZE)
  per_client = evaluation.build_federated_evaluation(
    model_fn, dataset_computation=client_data.build_dataset_computation(**data, shuffle=False)
  )
  cohort = cohort_evaluation.build_cohort_evaluation(
    model_fn,
    _builder,
    num_features=NUM_FEATURES,
    cohort_fn=cohort_data.make_cohort_fn(**data, shuffle=False),
  )
  return per_client, cohort


def _evaluate(process, weights, clients):
  state = process.set_model_weights(process.initialize(), weights)
  return evaluation.metrics_of(process.next(state, clients))


@pytest.mark.parametrize('max_cohort_size', [1, 2, len(CLIENT_SIZES)])
def test_cohort_evaluation_equals_per_client_evaluation(eval_clients, processes, max_cohort_size):
  per_client, cohort = processes
  # Weights away from the initial ones, so that the loss is not near log(3).
  rng = np.random.default_rng(0)
  weights = per_client.get_model_weights(per_client.initialize())
  weights = weights._replace(
    trainable=[
      (w + rng.normal(scale=0.5, size=np.shape(w))).astype(np.float32) for w in weights.trainable
    ]
  )
  expected = _evaluate(per_client, weights, eval_clients)
  cohorts = cohort_fedavg.group_into_cohorts(
    eval_clients, dict(CLIENT_SIZES), max_cohort_size=max_cohort_size
  )
  actual = _evaluate(cohort, weights, cohorts)
  assert actual.keys() == expected.keys()
  assert actual['num_examples'] == sum(CLIENT_SIZES.values())
  assert (
    actual['num_batches']
    == expected['num_batches']
    == sum(-(-n // BATCH_SIZE) for n in CLIENT_SIZES.values())
  )
  for name in expected:
    np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, err_msg=name)
  assert 0.0 < actual['accuracy'] < 1.0
