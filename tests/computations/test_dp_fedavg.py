"""The public DP-FedAvg builder: FedAvg over client ids with the capped-weight DP aggregator."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedpipe.computations import (
  client_data,
  dp_aggregator,
  dp_fedavg,
  dp_parameters,
  fedavg,
  keras_model,
)
from fedpipe.data import manifest
from fedpipe.errors import FedpipeError

NUM_FEATURES = 4
NUM_CLASSES = 2
CLIENT_SIZES = {'dpf-a': 3, 'dpf-b': 7, 'dpf-c': 12}


def _model_fn():
  def build():
    return keras_model.build_mlp(
      num_features=NUM_FEATURES, num_classes=NUM_CLASSES, hidden_units=(4,), seed=1
    )

  return keras_model.build_model_fn(build, num_features=NUM_FEATURES)


def _dataset_fn():
  return client_data.make_dataset_fn(
    split=manifest.TRAIN_SPLIT,
    num_features=NUM_FEATURES,
    batch_size=4,
    storage=manifest.STORAGE_TFRECORD_PER_CLIENT,  # The per-client files the tests write.
  )


def _params(**overrides):
  args = dict(
    client_example_counts=list(CLIENT_SIZES.values()),
    clients_per_round=len(CLIENT_SIZES),
    noise_multiplier=1.0,
    clip_norm=0.5,
  )
  args.update(overrides)
  return dp_parameters.derive_dp_parameters(**args)


def _process(params, **kwargs):
  return dp_fedavg.build_dp_fedavg_process(
    _model_fn(),
    client_optimizer=tff.learning.optimizers.build_sgdm(learning_rate=0.1),
    dataset_fn=_dataset_fn(),
    **params.dp_fedavg_arguments(),
    **kwargs,
  )


@pytest.fixture(scope='module')
def client_records(worker_dir):
  """Each client's records where the session's worker reads them."""
  rng = np.random.default_rng(3)
  for client_id, n in CLIENT_SIZES.items():
    path = os.path.join(worker_dir, manifest.client_file(manifest.TRAIN_SPLIT, client_id))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
      for features, label in zip(rng.normal(size=(n, NUM_FEATURES)), rng.integers(0, 2, n)):
        example = tf.train.Example(
          features=tf.train.Features(
            feature={
              'x': tf.train.Feature(float_list=tf.train.FloatList(value=features)),
              'y': tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            }
          )
        )
        writer.write(example.SerializeToString())
  return sorted(CLIENT_SIZES)


def test_takes_client_ids_and_has_fedavgs_signature_with_the_dp_aggregator():
  params = _params()
  process = _process(params)
  same = fedavg.build_fedavg_process(
    _model_fn(),
    client_optimizer=tff.learning.optimizers.build_sgdm(learning_rate=0.1),
    server_optimizer=tff.learning.optimizers.build_sgdm(learning_rate=1.0),
    model_aggregator=dp_aggregator.CappedWeightDPFactory.gaussian_fixed(
      noise_multiplier=1.0,
      clip_norm=0.5,
      weight_cap=params.weight_cap,
      expected_total_weight=params.expected_total_weight,
    ),
    dataset_fn=_dataset_fn(),
  )
  assert isinstance(process, tff.learning.templates.LearningProcess)
  assert process.next.type_signature.parameter[1] == tff.FederatedType(np.str_, tff.CLIENTS)
  assert process.next.type_signature.is_equivalent_to(same.next.type_signature)
  state_type = process.next.type_signature.result.state.member
  assert 'query_state' in tff.structure.name_list(state_type.aggregator)  # The DP query's.


def test_takes_datasets_without_a_dataset_fn():
  process = dp_fedavg.build_dp_fedavg_process(
    _model_fn(),
    noise_multiplier=0.0,
    clip_norm=1.0,
    weight_cap=1.0,
    expected_total_weight=1.0,
    client_optimizer=tff.learning.optimizers.build_sgdm(learning_rate=0.1),
  )
  clients = process.next.type_signature.parameter[1]
  assert clients.placement == tff.CLIENTS
  assert isinstance(clients.member, tff.SequenceType)


@pytest.mark.slow
@pytest.mark.usefixtures('tff_worker')
def test_one_round_runs_with_the_derived_noise_cap_and_denominator(client_records):
  params = _params()
  process = _process(params)
  state = process.initialize()
  query = state.aggregator.query_state
  assert query.numerator_state.stddev == pytest.approx(1.0 * 0.5)  # z * S.
  assert query.denominator == pytest.approx(params.expected_total_weight)
  before = process.get_model_weights(state)

  output = process.next(state, client_records)

  after = process.get_model_weights(output.state)
  assert output.metrics['client_work']['train']['num_examples'] == sum(CLIENT_SIZES.values())
  assert all(np.all(np.isfinite(w)) for w in after.trainable)
  assert not np.allclose(before.trainable[0], after.trainable[0])


@pytest.mark.slow
@pytest.mark.usefixtures('tff_worker')
def test_one_round_with_adaptive_clipping_moves_the_clip_norm(client_records):
  params = _params(
    clip_norm=None,
    noise_multiplier=0.0,
    adaptive_clipping=dp_parameters.AdaptiveClipping(initial_clip_norm=0.1),
  )
  process = _process(params, server_optimizer=tff.learning.optimizers.build_sgdm(0.5))

  output = process.next(process.initialize(), client_records)

  clip = float(output.metrics['aggregator']['dp_query_metrics']['clip'])
  assert clip != pytest.approx(0.1) and np.isfinite(clip)


@pytest.mark.parametrize(
  'kwargs,match',
  [
    (dict(clip_norm=None), 'exactly one of clip_norm'),
    (dict(adaptive_clipping=dp_parameters.AdaptiveClipping()), 'exactly one of clip_norm'),
    (
      dict(clip_norm=None, adaptive_clipping=dp_parameters.AdaptiveClipping()),
      'expected_clients_per_round',
    ),
    (dict(weight_cap=0.0), 'weight_cap'),
    (dict(noise_multiplier=-1.0), 'noise_multiplier'),
    (dict(proximal_strength=-0.1), 'proximal_strength'),
  ],
)
def test_bad_parameters_are_user_errors_that_name_them(kwargs, match):
  args = dict(
    noise_multiplier=1.0,
    clip_norm=1.0,
    weight_cap=1.0,
    expected_total_weight=1.0,
    client_optimizer=tff.learning.optimizers.build_sgdm(learning_rate=0.1),
  )
  args.update(kwargs)
  with pytest.raises(FedpipeError, match=match):
    dp_fedavg.build_dp_fedavg_process(_model_fn(), **args)
