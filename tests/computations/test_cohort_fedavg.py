"""The cohort engine's DP-FedAvg round equals the per-client engine's with the noise off.

Both processes read the same records where the worker runs, train the same
users (the cohort engine as two cohorts) from the same model and aggregate
with the same DP query, its noise off; after a round the server models
match, and so do the training metrics and, under adaptive clipping, the new
clip norm.
"""

import os

import numpy as np
import pytest
import tensorflow_federated as tff

from fedpipe.computations import (
  client_data,
  cohort_data,
  cohort_fedavg,
  dp_fedavg,
  dp_parameters,
  fedavg,
  keras_model,
)
from fedpipe.data import example_records, manifest

pytestmark = pytest.mark.usefixtures('tff_worker')

NUM_FEATURES = 5
NUM_CLASSES = 3
BATCH_SIZE = 4
# Strongly skewed, partial last batches included.
CLIENT_SIZES = {'co-a': 1, 'co-b': 3, 'co-c': 6, 'co-d': 9, 'co-e': 14, 'co-f': 40}


@pytest.fixture(scope='module')
def client_records(worker_dir):
  rng = np.random.default_rng(11)
  encoder = example_records.ExampleEncoder()
  for client_id, n in CLIENT_SIZES.items():
    x = rng.normal(size=(n, NUM_FEATURES)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, size=n).astype(np.int64)
    path = os.path.join(worker_dir, manifest.client_file(manifest.TRAIN_SPLIT, client_id))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    example_records.write_tfrecord_file(
      path, (encoder.encode(features, label) for features, label in zip(x.tolist(), y.tolist()))
    )
  return sorted(CLIENT_SIZES)


def _builder():
  return keras_model.build_mlp(
    num_features=NUM_FEATURES, num_classes=NUM_CLASSES, hidden_units=(8,), seed=3
  )


def _dp_arguments(clipping):
  arguments = dict(
    noise_multiplier=0.0,
    weight_cap=8.0,
    expected_total_weight=4.0,
    expected_clients_per_round=float(len(CLIENT_SIZES)),
  )
  if clipping == 'fixed':
    return dict(arguments, clip_norm=0.5)
  adaptive = dp_parameters.AdaptiveClipping(initial_clip_norm=0.5, clipped_count_stddev=0.0)
  return dict(arguments, adaptive_clipping=adaptive)


def _processes(clipping, epochs, proximal_strength):
  model_fn = keras_model.build_model_fn(_builder, num_features=NUM_FEATURES)
  server = tff.learning.optimizers.build_sgdm(learning_rate=1.0, momentum=0.9)
  data = dict(
    split=manifest.TRAIN_SPLIT,
    num_features=NUM_FEATURES,
    batch_size=BATCH_SIZE,
    epochs=epochs,
    shuffle=False,
    storage=manifest.STORAGE_TFRECORD_PER_CLIENT,  # The files written above.
  )
  per_client = dp_fedavg.build_dp_fedavg_process(
    model_fn,
    **_dp_arguments(clipping),
    client_optimizer=tff.learning.optimizers.build_sgdm(learning_rate=0.5),
    server_optimizer=server,
    proximal_strength=proximal_strength,
    dataset_fn=client_data.make_dataset_fn(**data),
  )
  cohort = cohort_fedavg.build_cohort_dp_fedavg_process(
    model_fn,
    _builder,
    num_features=NUM_FEATURES,
    aggregator=dp_fedavg.build_dp_aggregator(**_dp_arguments(clipping)),
    cohort_fn=cohort_data.make_cohort_fn(**data),
    client_learning_rate=0.5,
    server_optimizer=server,
    proximal_strength=proximal_strength,
  )
  return per_client, cohort


def _assert_same_round(cohort, actual, per_client, expected):
  """The two processes' rounds agree: the new server models and the training metrics."""
  for a, e in zip(
    cohort.get_model_weights(actual.state).trainable,
    per_client.get_model_weights(expected.state).trainable,
  ):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)
  train_a = actual.metrics['client_work']['train']
  train_e = expected.metrics['client_work']['train']
  for name in ('loss', 'accuracy', 'num_examples'):
    assert float(train_a[name]) == pytest.approx(float(train_e[name]), rel=1e-5), name


@pytest.mark.parametrize(
  ('clipping', 'epochs', 'proximal_strength'),
  # The full matrix (models, sizes, epochs, FedProx) is test_cohort_training's,
  # against the per-client update function; here the process around it.
  [('fixed', 1, 0.0), ('adaptive', 3, 0.3)],
)
def test_a_cohort_round_equals_a_per_client_round(
  client_records, clipping, epochs, proximal_strength
):
  per_client, cohort = _processes(clipping, epochs, proximal_strength)
  expected = per_client.next(per_client.initialize(), client_records)
  examples = dict(CLIENT_SIZES)
  cohorts = cohort_fedavg.group_into_cohorts(client_records, examples, max_cohort_size=4)
  assert len(cohorts) == 2
  actual = cohort.next(cohort.initialize(), cohorts)
  _assert_same_round(cohort, actual, per_client, expected)
  clip_a = actual.metrics['aggregator']['dp_query_metrics'].get('clip')
  clip_e = expected.metrics['aggregator']['dp_query_metrics'].get('clip')
  if clipping == 'adaptive':
    assert float(clip_a) == pytest.approx(float(clip_e), rel=1e-6)
    assert float(clip_a) != pytest.approx(0.5)  # The clip norm moved: the counts matter.


def test_users_are_grouped_by_size_into_even_cohorts():
  examples = {f'u{i}': n for i, n in enumerate([50, 1, 7, 3, 40, 2, 9])}
  cohorts = cohort_fedavg.group_into_cohorts(sorted(examples), examples, max_cohort_size=3)
  assert cohorts == ['u1,u5', 'u3,u2,u6', 'u4,u0']  # Sizes 2, 3, 2: ascending examples.
  # At least one cohort per core, while there are users enough.
  assert cohort_fedavg.group_into_cohorts(
    sorted(examples), examples, max_cohort_size=100, min_cohorts=2
  ) == ['u1,u5,u3,u2', 'u6,u4,u0']
  assert cohort_fedavg.group_into_cohorts(['a'], {'a': 1}, max_cohort_size=5, min_cohorts=2) == [
    'a'
  ]
  with pytest.raises(cohort_fedavg.CohortProcessError, match='max_cohort_size'):
    cohort_fedavg.group_into_cohorts(['a'], {'a': 1}, max_cohort_size=0)
  with pytest.raises(cohort_fedavg.CohortProcessError, match='min_cohorts'):
    cohort_fedavg.group_into_cohorts(['a'], {'a': 1}, max_cohort_size=1, min_cohorts=0)
  with pytest.raises(cohort_fedavg.CohortProcessError, match='contain'):
    cohort_fedavg.cohort_string(['a,b'])


def test_across_silos_a_cohort_holds_one_silos_users_and_is_routed_to_it_whole():
  from fedpipe.federation import cross_silo

  sizes = {'a': [5, 1, 3, 2, 4], 'b': [7], 'c': [2, 9, 1]}
  examples = {f'silo-{s}/u{i}': n for s, ns in sizes.items() for i, n in enumerate(ns)}
  sampled = sorted(examples, reverse=True)  # The order they come in does not matter.
  cohorts = cohort_fedavg.group_into_silo_cohorts(
    sampled, examples, max_cohort_size=2, min_cohorts=2
  )
  # Per silo as group_into_cohorts groups its users (ascending examples, at
  # most 2 each, at least 2 while there are users enough), silo name once.
  assert cohorts == [
    'silo-a/u1,u3',
    'silo-a/u2',
    'silo-a/u4,u0',
    'silo-b/u0',
    'silo-c/u2,u0',
    'silo-c/u1',
  ]
  routing = cross_silo.SiloRoutingContext({f'silo-{s}': None for s in sizes}, None)
  try:
    assert routing._split_by_silo(cohorts) == {
      'silo-a': ['u1,u3', 'u2', 'u4,u0'],
      'silo-b': ['u0'],
      'silo-c': ['u2,u0', 'u1'],
    }
  finally:
    routing.close()
  assert cohort_fedavg.group_into_silo_cohorts([], examples, max_cohort_size=2) == []
  for bad in ('u1', '/u1', 'silo-a/', 'silo-a/x/u1'):
    with pytest.raises(cohort_fedavg.CohortProcessError, match='is not <silo>/<client id>'):
      cohort_fedavg.group_into_silo_cohorts([bad], {}, max_cohort_size=2)
  with pytest.raises(cohort_fedavg.CohortProcessError, match='max_cohort_size'):
    cohort_fedavg.group_into_silo_cohorts([], {}, max_cohort_size=0)


def test_without_dp_a_cohort_round_equals_example_weighted_fedavg(client_records):
  """No aggregator: the cohort process is FedAvg, the mean of updates weighted by examples."""
  model_fn = keras_model.build_model_fn(_builder, num_features=NUM_FEATURES)
  server = tff.learning.optimizers.build_sgdm(learning_rate=1.0, momentum=0.9)
  data = dict(split=manifest.TRAIN_SPLIT, num_features=NUM_FEATURES, batch_size=BATCH_SIZE)
  per_client = fedavg.build_fedavg_process(
    model_fn,
    client_optimizer=tff.learning.optimizers.build_sgdm(learning_rate=0.5),
    server_optimizer=server,
    dataset_fn=client_data.make_dataset_fn(**data, epochs=2, shuffle=False),
  )
  cohort = cohort_fedavg.build_cohort_dp_fedavg_process(
    model_fn,
    _builder,
    num_features=NUM_FEATURES,
    aggregator=None,
    cohort_fn=cohort_data.make_cohort_fn(**data, epochs=2, shuffle=False),
    client_learning_rate=0.5,
    server_optimizer=server,
  )
  cohorts = cohort_fedavg.group_into_cohorts(client_records, dict(CLIENT_SIZES), max_cohort_size=4)
  expected = per_client.next(per_client.initialize(), client_records)
  actual = cohort.next(cohort.initialize(), cohorts)
  _assert_same_round(cohort, actual, per_client, expected)
