"""Federated evaluation whose TFF clients are cohorts of users, each evaluated in one call.

`evaluation.build_federated_evaluation` makes every evaluation user a TFF
client, and TFF's executor charges a fixed cost per client (about as much as
evaluating a small user). Here each CLIENTS member is a cohort string
(`cohort_fedavg.cohort_string`): one TensorFlow computation per cohort reads
its users' held-out records where they are (`cohort_data.make_cohort_fn`,
one pass, no shuffling), runs the global model once over all of them
(TFF's functional model) and returns the cohort's metric sums in the
layout the per-client engine's model reports them unfinalized. The server
sums the cohorts and finalizes with the model's own finalizers, so the
metrics are the per-client evaluation's: the label task's loss and metrics
(accuracy; AUC and accuracy for 'binary'; MAE and RMSE for 'regression', see
`cohort_training`) over all held-out examples, the number of examples and of
batches.

The process has `evaluation.build_federated_evaluation`'s interface:
`set_model_weights(initialize(), weights)`, then `next(state, cohorts)`, whose
metrics `evaluation.metrics_of` reads.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedpipe.computations import cohort_data, cohort_fedavg, cohort_training, keras_model
from fedpipe.data import record_schema


def _task_sums(
  task: str, output: tf.Tensor, batches: cohort_data.CohortBatches
) -> tuple[tf.Tensor, tf.Tensor, dict[str, list]]:
  """The loss sum, correct count and other metrics of a 'binary' or 'regression' cohort.

  A batch of the per-client evaluation is one (user, step) row of `batches`.
  """
  mask = tf.reshape(batches.mask, [-1, tf.shape(batches.mask)[2]])  # [K * S, B]
  predictions = tf.reshape(tf.nest.flatten(output)[0], tf.shape(mask))
  labels = tf.reshape(batches.y, tf.shape(mask))
  loss_sum = tf.reduce_sum(mask * cohort_training.example_losses(task, predictions, labels))
  sums = cohort_training.prediction_sums(task, predictions, labels, mask)
  correct = tf.reduce_sum(sums.pop('correct', tf.zeros([0])))
  metrics = cohort_training.task_metrics(
    task,
    {key: tf.reduce_sum(value, axis=0) for key, value in sums.items()},
    num_examples=tf.reduce_sum(mask),
    num_batches=tf.reduce_sum(tf.cast(tf.reduce_max(mask, axis=1) > 0, tf.float32)),
  )
  return loss_sum, correct, metrics


def build_cohort_evaluation(
  model_fn: Callable[[], tff.learning.models.VariableModel],
  keras_model_builder: keras_model.KerasModelBuilder,
  *,
  num_features: int,
  cohort_fn: Callable[[tf.Tensor], cohort_data.CohortBatches],
  seed: int = 0,
  label_task: str = record_schema.MULTICLASS,
) -> tff.learning.templates.LearningProcess:
  """Builds federated evaluation over cohorts of users (see the module docstring).

  Args:
    model_fn: The per-client engine's model constructor: the weights' types
      and the metrics' names and finalizers come from it.
    keras_model_builder: The Keras model `model_fn` wraps; its functional form
      evaluates the cohorts.
    num_features: Input width.
    cohort_fn: Reads a cohort's held-out batches from a tensor of ids
      (`cohort_data.make_cohort_fn(split=EVAL_SPLIT, shuffle=False)`); its
      batch size sets `num_batches` as the per-client evaluation's does.
    seed: Seeds the functional model's build as `model_fn`'s.
    label_task: The client data's label task, as `model_fn` was built for:
      the loss and metrics.

  Returns:
    A `tff.learning.templates.LearningProcess` whose state is the model weights.

  Raises:
    cohort_training.CohortNotVectorizableError: If the model cannot be made
      functional (the message names the layer and the fallback).
    cohort_fedavg.CohortProcessError: If `model_fn`'s model reports metrics
      the cohort engine does not compute for `label_task`.
  """
  task = record_schema.check_label_task(label_task)
  functional = cohort_training.functional_model_from_builder(
    keras_model_builder, num_features=num_features, seed=seed, label_task=task
  )
  with tf.Graph().as_default():
    model = model_fn()
    metrics_aggregation_fn = tff.learning.metrics.sum_then_finalize(model.metric_finalizers())
    metric_names = list(model.report_local_unfinalized_metrics().keys())
  cohort_fedavg.check_metric_names(metric_names, task)

  @tff.tensorflow.computation()
  def initial_model_weights_fn():
    return tff.learning.models.ModelWeights.from_model(model_fn())

  weights_type = initial_model_weights_fn.type_signature.result

  @tff.tensorflow.computation(weights_type, np.str_)
  def evaluate_cohort_fn(weights, cohort):
    batches = cohort_fn(tf.strings.split(cohort, cohort_fedavg.SEPARATOR))
    x = tf.reshape(batches.x, [-1, num_features])
    y = tf.reshape(batches.y, [-1])
    mask = tf.reshape(batches.mask, [-1])
    output = functional.predict_on_batch(
      (tuple(weights.trainable), tuple(weights.non_trainable)), x, training=False
    )
    if task == record_schema.MULTICLASS:
      # The loss averages over every slot, padding (weight 0) included: times
      # the slots it is the sum over the real examples.
      loss_sum = functional.loss(output=output, label=y, sample_weight=mask) * tf.cast(
        tf.size(mask), tf.float32
      )
      predictions = tf.nest.flatten(output)[0]
      correct = tf.reduce_sum(mask * tf.cast(tf.equal(tf.argmax(predictions, -1), y), tf.float32))
      task_metrics = {}
    else:
      loss_sum, correct, task_metrics = _task_sums(task, output, batches)
    result = cohort_training.CohortResult(
      update_sum=[],
      weight_sum=tf.constant(0.0),
      below_clip_count=tf.constant(0),
      num_clients=tf.size(batches.num_examples),
      loss_sum=loss_sum,
      accuracy_count=correct,
      num_examples=tf.cast(tf.reduce_sum(mask), tf.int64),
      # A batch of the per-client evaluation is a (user, step) with an example.
      num_batches=tf.reduce_sum(tf.cast(tf.reduce_max(batches.mask, axis=2) > 0, tf.int64)),
      task_metrics=task_metrics,
    )
    metrics = cohort_training.unfinalized_metrics(result, task)
    return collections.OrderedDict((k, metrics[k]) for k in metric_names)

  @tff.federated_computation()
  def init_fn():
    return tff.federated_eval(initial_model_weights_fn, tff.SERVER)

  @tff.federated_computation(
    tff.FederatedType(weights_type, tff.SERVER), tff.FederatedType(np.str_, tff.CLIENTS)
  )
  def next_fn(weights, cohorts):
    metrics = tff.federated_map(evaluate_cohort_fn, (tff.federated_broadcast(weights), cohorts))
    measurements = tff.federated_zip(
      collections.OrderedDict(
        client_work=tff.federated_zip(
          collections.OrderedDict(
            eval=tff.federated_zip(
              collections.OrderedDict(current_round_metrics=metrics_aggregation_fn(metrics))
            )
          )
        )
      )
    )
    return tff.learning.templates.LearningProcessOutput(weights, measurements)

  @tff.tensorflow.computation(weights_type)
  def get_model_weights_fn(weights):
    return weights

  @tff.tensorflow.computation(weights_type, weights_type)
  def set_model_weights_fn(_, weights):
    return weights

  return tff.learning.templates.LearningProcess(
    init_fn, next_fn, get_model_weights_fn, set_model_weights_fn
  )
