"""Fingerprints: equal for rebuilds of a computation, different for any changed op."""

import functools

import pytest

from fedpipe.governance import fingerprint as computation_fingerprint


def _users_own_model():
  """A data scientist's model as a notebook writes it: unnamed layers, unseeded initializers."""
  import tensorflow as tf

  return tf.keras.Sequential(
    [
      tf.keras.Input(shape=(8,)),
      tf.keras.layers.Dense(16, activation='relu'),
      tf.keras.layers.Dense(3),
    ]
  )


def _silo_side_of_training(hidden_units=(16,), activation_change=False, builder=None):
  """The computation a silo receives for one round of fedpipe's DP-FedAvg."""
  import tensorflow as tf
  import tensorflow_federated as tff

  from fedpipe.computations import client_data, dp_aggregator, fedavg, keras_model
  from fedpipe.runtime import execution_context

  def build():
    model = keras_model.build_mlp(num_features=8, num_classes=3, hidden_units=hidden_units)
    if activation_change:  # One op: ReLU becomes ELU in the hidden layer.
      model.get_layer('hidden_0').activation = tf.keras.activations.elu
    return model

  build = builder or build

  process = fedavg.build_fedavg_process(
    keras_model.build_model_fn(build, num_features=8),
    client_optimizer=tff.learning.optimizers.build_sgdm(0.1),
    server_optimizer=tff.learning.optimizers.build_sgdm(1.0),
    model_aggregator=dp_aggregator.CappedWeightDPFactory.gaussian_fixed(
      noise_multiplier=1.0, clip_norm=0.5, weight_cap=10, expected_total_weight=20.0
    ),
    dataset_fn=client_data.make_dataset_fn(split='train', num_features=8, batch_size=4),
  )
  form = tff.backends.native.compile_to_mergeable_comp_form(process.next)
  return execution_context.wire_computation(form.up_to_merge)


@functools.cache
def _first_build():
  return computation_fingerprint.fingerprint(_silo_side_of_training())


def test_rebuilding_in_the_same_process_gives_the_same_fingerprint():
  # TF numbers traced functions with a process-wide counter: the second build
  # differs byte-wise from the first.
  assert computation_fingerprint.fingerprint(_silo_side_of_training()) == _first_build()


@pytest.mark.parametrize(
  'change', [{'activation_change': True}, {'hidden_units': (17,)}], ids=['one-op', 'one-unit']
)
def test_any_change_changes_the_fingerprint(change):
  assert computation_fingerprint.fingerprint(_silo_side_of_training(**change)) != _first_build()


def test_short_form():
  assert computation_fingerprint.short('sha256:0123456789abcdef') == '0123456789ab'
