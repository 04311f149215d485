"""Tests of fedpipe.computations.keras_model for the label tasks 'binary' and 'regression'."""

import collections

import numpy as np
import pytest
import tensorflow as tf

from fedpipe.computations import client_data, keras_model


def _model(outputs):
  return lambda: tf.keras.Sequential([tf.keras.Input(shape=(3,)), tf.keras.layers.Dense(outputs)])


def test_build_mlp_outputs_the_task_width():
  model = keras_model.build_mlp(num_features=5, num_classes=2, hidden_units=(4,), num_outputs=1)
  assert model.output_shape == (None, 1)
  model = keras_model.build_mlp(num_features=5, num_classes=3, hidden_units=(4,))
  assert model.output_shape == (None, 3)
  assert keras_model.num_outputs('binary', 2) == keras_model.num_outputs('regression', 0) == 1
  assert keras_model.num_outputs('multiclass', 7) == 7


@pytest.mark.parametrize('task, classes', [('binary', 2), ('regression', 0)])
def test_check_keras_model_wants_one_output_for_binary_and_regression(task, classes):
  keras_model.check_keras_model(_model(1), num_features=3, num_classes=classes, label_task=task)
  with pytest.raises(keras_model.ModelMismatchError) as error:
    keras_model.check_keras_model(_model(2), num_features=3, num_classes=classes, label_task=task)
  message = str(error.value)
  assert 'outputs (2, 2)' in message and 'output shape (None, 1)' in message
  assert f"label.task is '{task}'" in message and 'num_outputs' in message


def test_check_keras_model_of_multiclass_is_as_before():
  with pytest.raises(keras_model.ModelMismatchError, match=r'\(None, 3\) \(one logit or prob'):
    keras_model.check_keras_model(_model(2), num_features=3, num_classes=3)


def _forward(task, y, outputs=1):
  model_fn = keras_model.build_model_fn(_model(outputs), num_features=3, label_task=task)
  model = model_fn()
  batch = collections.OrderedDict(x=np.ones((4, 3), np.float32), y=y)
  model.forward_pass(batch, training=False)
  return model, model.report_local_unfinalized_metrics()


def test_binary_model_has_binary_cross_entropy_auc_and_accuracy():
  assert client_data.batch_spec(3, label_task='binary')['y'].dtype == tf.int64
  model, metrics = _forward('binary', np.array([0, 1, 1, 0], np.int64))
  assert {'auc', 'accuracy', 'loss'} <= set(metrics)
  loss, _ = keras_model.loss_and_metrics('binary', None)
  assert isinstance(loss, tf.keras.losses.BinaryCrossentropy)


@pytest.mark.parametrize(
  'task,y',
  [
    ('binary', np.array([0, 1, 1, 0], np.int64)),
    ('regression', np.array([0.5, 1.0, -2.0, 3.0], np.float32)),
  ],
)
def test_each_tasks_metrics_fit_what_a_silo_lets_an_evaluation_release(task, y):
  """A silo's review refuses an evaluation releasing more than 64 numbers (AUC's counts included)."""
  from fedpipe.governance import review

  _, metrics = _forward(task, y)
  released = sum(int(np.size(v)) for v in tf.nest.flatten(metrics))
  assert released <= review.MAX_EVALUATION_OUTPUTS


def test_regression_model_has_mse_mae_and_rmse():
  assert client_data.batch_spec(3, label_task='regression')['y'].dtype == tf.float32
  model, metrics = _forward('regression', np.array([0.5, 1.0, -2.0, 3.0], np.float32))
  assert {'mae', 'rmse', 'loss'} <= set(metrics) and 'accuracy' not in metrics
  loss, _ = keras_model.loss_and_metrics('regression', None)
  assert isinstance(loss, tf.keras.losses.MeanSquaredError)


def test_weighted_batches_carry_w():
  spec = client_data.batch_spec(3, label_task='regression', weighted=True)
  assert list(spec) == ['x', 'y', 'w'] and spec['w'].dtype == tf.float32
