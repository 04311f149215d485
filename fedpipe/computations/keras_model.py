"""Keras models and their TFF wrapping.

`build_model_fn` turns a Keras model builder into the no-argument
`tff.learning.models.VariableModel` constructor that TFF's learning builders
take; a new Keras model is built inside each TFF graph, as TFF requires.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import tensorflow as tf
import tensorflow_federated as tff

from fedpipe.computations import client_data

KerasModelBuilder = Callable[[], tf.keras.Model]


def build_mlp(
  *,
  num_features: int,
  num_classes: int,
  hidden_units: Sequence[int] = (64, 64),
  seed: int = 0,
) -> tf.keras.Model:
  """A ReLU multi-layer perceptron that outputs class logits.

  Args:
    num_features: Input width.
    num_classes: Number of output classes.
    hidden_units: Width of each hidden layer.
    seed: Seed of the weight initializers (the initial global model).

  Returns:
    An uncompiled `tf.keras.Model`.
  """
  inputs = tf.keras.Input(shape=(num_features,), name=client_data.FEATURES_KEY)
  x = inputs
  for i, units in enumerate(hidden_units):
    x = tf.keras.layers.Dense(
      int(units),
      activation='relu',
      kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed + i),
      name=f'hidden_{i}',
    )(x)
  logits = tf.keras.layers.Dense(
    num_classes,
    kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed + len(hidden_units)),
    name='logits',
  )(x)
  # A fixed name keeps the traced graphs (and so approved computation
  # fingerprints) independent of how many models the process built before.
  return tf.keras.Model(inputs=inputs, outputs=logits, name='mlp')


def build_model_fn(
  keras_model_builder: KerasModelBuilder, *, num_features: int
) -> Callable[[], tff.learning.models.VariableModel]:
  """A TFF model constructor for a classifier over `client_data` batches.

  Args:
    keras_model_builder: Builds a fresh Keras model mapping `num_features`
      floats to class logits.
    num_features: Input width, as in the client data.

  Returns:
    A no-argument callable returning a `tff.learning.models.VariableModel`
    with sparse categorical cross-entropy loss and accuracy.
  """
  input_spec = client_data.batch_spec(num_features)

  def model_fn() -> tff.learning.models.VariableModel:
    return tff.learning.models.from_keras_model(
      keras_model_builder(),
      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      input_spec=input_spec,
      metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name='accuracy')],
    )

  return model_fn


def as_keras_batch(batch: collections.OrderedDict) -> tuple[tf.Tensor, tf.Tensor]:
  """Splits a client-data batch into Keras's (inputs, labels)."""
  return batch[client_data.FEATURES_KEY], batch[client_data.LABEL_KEY]
