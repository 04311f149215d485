"""A data scientist's model is checked against the data before training (computations.keras_model)."""

import pytest
import tensorflow as tf

from fedpipe.computations import keras_model


def _dense(num_features=8, num_classes=3, activation=None):
  return tf.keras.Sequential(
    [
      tf.keras.Input(shape=(num_features,)),
      tf.keras.layers.Dense(num_classes, activation=activation),
    ]
  )


class _Subclassed(tf.keras.Model):
  def __init__(self):
    super().__init__()
    self.first = tf.keras.layers.Dense(4, input_shape=(5,))
    self.last = tf.keras.layers.Dense(3)

  def call(self, x):
    return self.last(self.first(tf.reshape(x, [-1, 5])))


def _check(builder):
  keras_model.check_keras_model(builder, num_features=8, num_classes=3)


def test_a_model_that_fits_passes_functional_or_subclassed():
  _check(_dense)
  _check(lambda: _dense(activation='softmax'))
  keras_model.check_keras_model(_Subclassed, num_features=5, num_classes=3)


@pytest.mark.parametrize(
  'builder,expected',
  [
    (lambda: _dense(num_features=4), 'takes inputs of shape (None, 4)'),
    (lambda: _dense(num_classes=2), 'outputs (2, 2) for a batch of 2'),
    (_Subclassed, 'cannot take a batch of 8 features'),
  ],
)
def test_a_model_of_the_wrong_shape_names_the_shapes_it_must_have(builder, expected):
  with pytest.raises(keras_model.ModelMismatchError) as error:
    _check(builder)
  assert expected in str(error.value)
  assert 'must take inputs of shape (None, 8)' in str(error.value)
  assert 'output shape (None, 3)' in str(error.value)


def test_a_compiled_model_a_non_model_and_a_builder_with_arguments_are_refused():
  def compiled():
    model = _dense()
    model.compile(loss='mse')
    return model

  with pytest.raises(keras_model.ModelMismatchError, match='without calling compile'):
    _check(compiled)
  with pytest.raises(keras_model.ModelMismatchError, match='returned str, not a tf.keras.Model'):
    _check(lambda: 'a model')
  with pytest.raises(keras_model.ModelMismatchError, match='cannot be called without arguments'):
    _check(lambda width: _dense())


def test_the_loss_matches_logits_or_probabilities():
  assert not keras_model.outputs_probabilities(_dense())
  assert keras_model.outputs_probabilities(_dense(activation='softmax'))
  softmax_layer = tf.keras.Sequential(
    [tf.keras.Input(shape=(8,)), tf.keras.layers.Dense(3), tf.keras.layers.Softmax()]
  )
  assert keras_model.outputs_probabilities(softmax_layer)
  assert not keras_model.outputs_probabilities(keras_model.build_mlp(num_features=8, num_classes=3))


def test_the_architecture_identifies_the_model_not_how_many_were_built_before():
  first = keras_model.architecture(_dense)
  _dense(), _dense()  # Keras numbers the layers of eager models built meanwhile.
  assert keras_model.architecture(_dense) == first
  assert keras_model.architecture(lambda: _dense(activation='tanh')) != first
  assert keras_model.architecture(_Subclassed)
