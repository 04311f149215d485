"""fedpipe's client-id FedAvg computes what TFF's own weighted FedAvg computes.

fedpipe's training process reads each client's records by id inside the
client computation (`client_work.build_client_work_over_ids`) instead of
taking datasets; these tests pin it to `tff.learning.algorithms.build_weighted_fed_avg`
run on the same records as in-memory datasets: after one round the server's
model is the same, without DP and with the DP aggregator when its noise is off
and its clip norm and weight cap cannot bind.
"""

import collections
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedpipe.computations import client_data, dp_aggregator, fedavg, keras_model
from fedpipe.data import example_records, manifest

pytestmark = pytest.mark.usefixtures('tff_worker')

NUM_FEATURES = 5
NUM_CLASSES = 3
BATCH_SIZE = 4
CLIENT_SIZES = {'eq-a': 3, 'eq-b': 6, 'eq-c': 9, 'eq-d': 14}  # Partial last batches included.


def _write_clients(worker_dir):
  """Writes each client's records where the worker reads them; returns their (x, y)."""
  rng = np.random.default_rng(7)
  encoder = example_records.ExampleEncoder()
  data = {}
  for client_id, n in CLIENT_SIZES.items():
    x = rng.normal(size=(n, NUM_FEATURES)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, size=n).astype(np.int64)
    path = os.path.join(worker_dir, manifest.client_file(manifest.TRAIN_SPLIT, client_id))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    example_records.write_tfrecord_file(
      path, (encoder.encode(features, label) for features, label in zip(x.tolist(), y.tolist()))
    )
    data[client_id] = (x, y)
  return data


def _model_fn():
  def build():
    return keras_model.build_mlp(
      num_features=NUM_FEATURES, num_classes=NUM_CLASSES, hidden_units=(8,), seed=3
    )

  return keras_model.build_model_fn(build, num_features=NUM_FEATURES)


def _optimizers():
  return dict(
    client=tff.learning.optimizers.build_sgdm(learning_rate=0.5),
    server=tff.learning.optimizers.build_sgdm(learning_rate=1.0, momentum=0.9),
  )


def _tff_fed_avg_round(data, initial_weights):
  opt = _optimizers()
  process = tff.learning.algorithms.build_weighted_fed_avg(
    _model_fn(), client_optimizer_fn=opt['client'], server_optimizer_fn=opt['server']
  )
  state = process.set_model_weights(process.initialize(), initial_weights)
  datasets = [
    tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(BATCH_SIZE)
    for x, y in (data[c] for c in sorted(data))
  ]
  output = process.next(state, datasets)
  return process.get_model_weights(output.state), output.metrics['client_work']['train']


def _fedpipe_round(aggregator):
  opt = _optimizers()
  process = fedavg.build_fedavg_process(
    _model_fn(),
    client_optimizer=opt['client'],
    server_optimizer=opt['server'],
    model_aggregator=aggregator,
    dataset_fn=client_data.make_dataset_fn(
      split=manifest.TRAIN_SPLIT,
      num_features=NUM_FEATURES,
      batch_size=BATCH_SIZE,
      shuffle=False,
      storage=manifest.STORAGE_TFRECORD_PER_CLIENT,  # The files written above.
    ),
  )
  state = process.initialize()
  initial = process.get_model_weights(state)
  output = process.next(state, sorted(CLIENT_SIZES))
  return initial, process.get_model_weights(output.state), output.metrics['client_work']['train']


def _assert_same_weights(actual, expected):
  for a, e in zip(actual.trainable, expected.trainable):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope='module')
def client_records(worker_dir):
  return _write_clients(worker_dir)


def test_plain_fedavg_over_ids_equals_tff_weighted_fed_avg(client_records):
  initial, weights, metrics = _fedpipe_round(aggregator=None)
  expected, tff_metrics = _tff_fed_avg_round(client_records, initial)

  assert not np.allclose(weights.trainable[0], initial.trainable[0])  # The round moved the model.
  _assert_same_weights(weights, expected)
  assert metrics['num_examples'] == tff_metrics['num_examples'] == sum(CLIENT_SIZES.values())
  np.testing.assert_allclose(metrics['loss'], tff_metrics['loss'], rtol=1e-5)


def test_dp_fedavg_with_noise_off_equals_tff_weighted_fed_avg(client_records):
  # No noise, a clip norm no update reaches, the cap at the largest client
  # (capped weights n_k / cap, none truncated) and the exact total capped
  # weight as the fixed denominator: the DP sum / denominator is the
  # example-weighted mean TFF computes.
  cap = float(max(CLIENT_SIZES.values()))
  aggregator = dp_aggregator.CappedWeightDPFactory.gaussian_fixed(
    noise_multiplier=0.0,
    clip_norm=1e6,
    weight_cap=cap,
    expected_total_weight=sum(CLIENT_SIZES.values()) / cap,
  )
  initial, weights, _ = _fedpipe_round(aggregator)
  expected, _ = _tff_fed_avg_round(client_records, initial)

  _assert_same_weights(weights, expected)


def test_a_binding_clip_norm_makes_the_dp_round_differ(client_records):
  # The comparison above can fail: clipping every update changes the result.
  aggregator = dp_aggregator.CappedWeightDPFactory.gaussian_fixed(
    noise_multiplier=0.0,
    clip_norm=1e-3,
    weight_cap=float(max(CLIENT_SIZES.values())),
    expected_total_weight=sum(CLIENT_SIZES.values()) / max(CLIENT_SIZES.values()),
  )
  initial, weights, _ = _fedpipe_round(aggregator)
  expected, _ = _tff_fed_avg_round(client_records, initial)

  assert not np.allclose(weights.trainable[0], expected.trainable[0], rtol=1e-5, atol=1e-6)
