"""The cohort engine trains 'binary' and 'regression' client data as the per-client engine does.

The reference is TFF's own local update of one client (as in
test_cohort_training), its model built by `keras_model.build_model_fn` for
the label task, so its loss and metrics are `keras_model.loss_and_metrics`'s:
binary cross-entropy with AUC and accuracy, or mean squared error with MAE
and RMSE. The cohort engine must give the same clipped, weighted update sum
and the same unfinalized metrics (every leaf, the AUC's confusion counts at
each of its thresholds included) within 1e-5 relative.
"""

import collections
import functools

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedpipe.computations import cohort_training, keras_model, proximal_optimizer

NUM_FEATURES = 6
BATCH_SIZE = 4
LEARNING_RATE = 0.1
WEIGHT_CAP = 10.0
RTOL = 1e-5
SIZES = {'equal': [8] * 6, 'skewed': [1, 3, 17, 40, 0, 5]}  # An empty client is all padding.
TASKS = ('binary', 'regression')


def _mlp():
  return keras_model.build_mlp(
    num_features=NUM_FEATURES, num_classes=2, hidden_units=(5,), seed=1, num_outputs=1
  )


@functools.cache
def _functional(task):
  return cohort_training.functional_model_from_builder(
    _mlp, num_features=NUM_FEATURES, label_task=task
  )


def _labels(task, rng, n):
  if task == 'regression':
    return rng.normal(loc=0.5, scale=1.0, size=n).astype(np.float32)
  return rng.integers(0, 2, size=n).astype(np.int64)


def _clients(task, sizes, seed=0):
  rng = np.random.default_rng(seed)
  return [
    (rng.normal(size=(n, NUM_FEATURES)).astype(np.float32), _labels(task, rng, n)) for n in sizes
  ]


class _Reference:
  """TFF's local update of one client, in a graph, for a model of the label task."""

  def __init__(self, task, proximal_strength=0.0, momentum=None):
    trainable, non_trainable = _functional(task).initial_weights
    optimizer = tff.learning.optimizers.build_sgdm(learning_rate=LEARNING_RATE, momentum=momentum)
    if proximal_strength > 0:
      optimizer = proximal_optimizer.ProximalOptimizer(optimizer, proximal_strength)
    self._graph = tf.Graph()
    with self._graph.as_default():
      created = []

      def model_fn():
        build = keras_model.build_model_fn(_mlp, num_features=NUM_FEATURES, label_task=task)
        created.append(build())
        return created[-1]

      update = tff.learning.templates.model_delta_client_work
      update = update.build_model_delta_update_with_tff_optimizer(
        model_fn=model_fn,
        weighting=tff.learning.ClientWeighting.NUM_EXAMPLES,
        loop_implementation=tff.learning.LoopImplementation.DATASET_REDUCE,
      )
      hparams = optimizer.get_hparams(optimizer.initialize(tf.TensorSpec([], tf.float32)))
      update = functools.partial(update, optimizer, optimizer_hparams=hparams)
      tff_model = created[0]
      weights = tff.learning.models.ModelWeights(
        trainable=[tf.constant(w) for w in trainable],
        non_trainable=[tf.constant(w) for w in non_trainable],
      )
      self._x = tf.compat.v1.placeholder(tf.float32, [None, NUM_FEATURES])
      label_dtype = tf.float32 if task == 'regression' else tf.int64
      self._y = tf.compat.v1.placeholder(label_dtype, [None])
      self._epochs = tf.compat.v1.placeholder(tf.int64, [])
      data = tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=self._x, y=self._y))
      result, metrics = update(
        initial_weights=weights, data=data.repeat(self._epochs).batch(BATCH_SIZE)
      )
      self._fetches = (result.update, result.update_weight, metrics)
      self._reset_metrics = tf.compat.v1.variables_initializer(tff_model.local_variables)
      init = [tf.compat.v1.global_variables_initializer(), self._reset_metrics]
    self._session = tf.compat.v1.Session(graph=self._graph)
    self._session.run(init)

  def __call__(self, clients, *, epochs):
    """Per-client updates and weights, and the unfinalized metrics summed over the clients."""
    self._session.run(self._reset_metrics)
    deltas, client_weights = [], []
    for x, y in clients:
      feed = {self._x: x, self._y: y, self._epochs: epochs}
      update, weight, metrics = self._session.run(self._fetches, feed_dict=feed)
      deltas.append(list(update))
      client_weights.append(float(weight))
    return deltas, client_weights, {k: [np.asarray(v) for v in vs] for k, vs in metrics.items()}


_reference = functools.cache(_Reference)


@functools.cache
def _runner(task, proximal_strength=0.0, momentum=None, vectorize=True):
  return cohort_training.CohortRunner(
    _functional(task),
    learning_rate=LEARNING_RATE,
    momentum=momentum,
    proximal_strength=proximal_strength,
    clip_norm=1.0,  # Each call passes its own.
    weight_cap=WEIGHT_CAP,
    vectorize=vectorize,
    label_task=task,
  )


def _dp_sum(deltas, client_weights, clip_norm):
  """Σ min(n_k / cap, 1) · clip(Δ_k, S), the global-norm clip, and Σ min(n_k / cap, 1)."""
  total = [np.zeros_like(d) for d in deltas[0]]
  weight_sum = 0.0
  for delta, weight in zip(deltas, client_weights):
    capped = min(weight / WEIGHT_CAP, 1.0)
    norm = np.sqrt(sum(float((d.astype(np.float64) ** 2).sum()) for d in delta))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    total = [t + capped * scale * d for t, d in zip(total, delta)]
    weight_sum += capped
  return total, weight_sum


def _middle_clip(deltas):
  norms = sorted(np.sqrt(sum(float((d**2).sum()) for d in delta)) for delta in deltas)
  return float((norms[len(norms) // 2 - 1] + norms[len(norms) // 2]) / 2)


def assert_same_metrics(actual, expected, rtol=RTOL):
  """Every unfinalized leaf equal within `rtol`; AUC's confusion counts exactly."""
  assert sorted(actual) == sorted(expected)
  for name, leaves in expected.items():
    assert len(actual[name]) == len(leaves), name
    for i, (a, e) in enumerate(zip(actual[name], leaves)):
      a, e = np.asarray(a), np.asarray(e)
      assert a.shape == e.shape, (name, i, a.shape, e.shape)
      if name == 'auc':
        np.testing.assert_array_equal(a, e, err_msg=f'auc[{i}]')
      else:
        np.testing.assert_allclose(a, e, rtol=rtol, err_msg=f'{name}[{i}]')


@pytest.mark.parametrize('epochs', [1, 2])
@pytest.mark.parametrize('sizes', sorted(SIZES))
@pytest.mark.parametrize('task', TASKS)
def test_cohort_training_equals_the_per_client_engines(task, sizes, epochs):
  clients = _clients(task, SIZES[sizes])
  deltas, client_weights, metrics = _reference(task)(clients, epochs=epochs)
  clip_norm = _middle_clip(deltas)
  expected_sum, expected_weight = _dp_sum(deltas, client_weights, clip_norm)

  cohort = cohort_training.stack_cohort(
    clients, batch_size=BATCH_SIZE, epochs=epochs, label_task=task
  )
  result = _runner(task)(_functional(task).initial_weights, cohort, clip_norm=clip_norm)

  scale = max(np.abs(e).max() for e in expected_sum)
  error = max(np.abs(a - e).max() for a, e in zip(result.update_sum, expected_sum)) / scale
  assert error <= RTOL, f'relative error {error:.2e}'
  assert result.weight_sum == pytest.approx(expected_weight, rel=RTOL)
  assert result.below_clip_count == len(clients) // 2
  actual = cohort_training.unfinalized_metrics(result, task)
  assert_same_metrics(actual, metrics)
  assert list(actual) == list(metrics) or sorted(actual) == sorted(metrics)
  if task == 'binary':
    true_positives, true_negatives, false_positives, false_negatives = actual['auc']
    # At -ε every example is predicted positive, at 1+ε none is.
    positives = sum(int(y.sum()) for _, y in clients) * epochs
    assert true_positives[0] == positives and false_negatives[-1] == positives
    assert true_negatives[0] == 0 and false_positives[-1] == 0


@pytest.mark.parametrize('task', TASKS)
def test_fedprox_and_client_momentum_match_the_per_client_engine(task):
  # Momentum and FedProx: a padded step must leave weights, state and metrics alone.
  clients = _clients(task, SIZES['skewed'], seed=1)
  deltas, client_weights, metrics = _reference(task, 0.5, 0.9)(clients, epochs=2)
  clip_norm = _middle_clip(deltas)
  expected_sum, expected_weight = _dp_sum(deltas, client_weights, clip_norm)

  cohort = cohort_training.stack_cohort(clients, batch_size=BATCH_SIZE, epochs=2, label_task=task)
  result = _runner(task, 0.5, 0.9)(_functional(task).initial_weights, cohort, clip_norm=clip_norm)

  scale = max(np.abs(e).max() for e in expected_sum)
  error = max(np.abs(a - e).max() for a, e in zip(result.update_sum, expected_sum)) / scale
  assert error <= RTOL, f'relative error {error:.2e}'
  assert result.weight_sum == pytest.approx(expected_weight, rel=RTOL)
  assert_same_metrics(cohort_training.unfinalized_metrics(result, task), metrics)


@pytest.mark.parametrize('task', TASKS)
def test_the_unvectorized_path_computes_the_same(task):
  clients = _clients(task, SIZES['skewed'], seed=5)
  cohort = cohort_training.stack_cohort(clients, batch_size=BATCH_SIZE, epochs=2, label_task=task)
  weights = _functional(task).initial_weights

  expected = _runner(task)(weights, cohort, clip_norm=0.5)
  actual = _runner(task, vectorize=False)(weights, cohort, clip_norm=0.5)

  for a, e in zip(actual.update_sum, expected.update_sum):
    np.testing.assert_allclose(a, e, rtol=RTOL, atol=1e-7)
  assert actual.below_clip_count == expected.below_clip_count
  assert_same_metrics(
    cohort_training.unfinalized_metrics(actual, task),
    cohort_training.unfinalized_metrics(expected, task),
  )


@pytest.mark.parametrize('task', TASKS)
def test_the_metrics_have_the_per_client_models_unfinalized_layout(task):
  with tf.Graph().as_default():
    model = keras_model.build_model_fn(_mlp, num_features=NUM_FEATURES, label_task=task)()
    expected = model.report_local_unfinalized_metrics()
  cohort = cohort_training.stack_cohort(_clients(task, [3, 5]), batch_size=2, label_task=task)
  result = _runner(task)(_functional(task).initial_weights, cohort, clip_norm=1.0)
  actual = cohort_training.unfinalized_metrics(result, task)
  assert sorted(actual) == sorted(expected) == sorted(cohort_training.metric_names(task))
  for name, leaves in expected.items():
    assert [(tuple(t.shape), t.dtype.as_numpy_dtype) for t in leaves] == [
      (np.shape(v), np.asarray(v).dtype) for v in actual[name]
    ], name
  if task == 'binary':
    thresholds = keras_model.AUC_THRESHOLDS
    assert [np.shape(v) for v in actual['auc']] == [(thresholds,)] * 4


@pytest.mark.parametrize('task', TASKS)
def test_a_non_finite_client_contributes_no_update_and_no_metrics(task):
  clients = _clients(task, [5, 9, 3], seed=2)
  clients[0][0][2, 1] = np.inf
  deltas, client_weights, metrics = _reference(task)(clients, epochs=1)
  assert client_weights[0] == 0.0
  expected_sum, expected_weight = _dp_sum(deltas, client_weights, clip_norm=1.0)

  cohort = cohort_training.stack_cohort(clients, batch_size=BATCH_SIZE, label_task=task)
  result = _runner(task)(_functional(task).initial_weights, cohort, clip_norm=1.0)

  for a, e in zip(result.update_sum, expected_sum):
    np.testing.assert_allclose(a, e, rtol=RTOL, atol=1e-7)
  assert result.weight_sum == pytest.approx(expected_weight, rel=RTOL)
  assert result.num_examples == 12
  assert_same_metrics(cohort_training.unfinalized_metrics(result, task), metrics)


def test_regression_labels_are_stacked_as_floats_and_strings_are_refused():
  clients = [(np.zeros((2, 3)), np.array([0.5, -1.25]))]
  cohort = cohort_training.stack_cohort(clients, batch_size=2, label_task='regression')
  assert cohort.y.dtype == np.float32
  np.testing.assert_array_equal(cohort.y[0, 0], [0.5, -1.25])
  with pytest.raises(cohort_training.CohortTrainingError, match='integer class ids'):
    cohort_training.stack_cohort(clients, batch_size=2, label_task='binary')
  with pytest.raises(cohort_training.CohortTrainingError, match='must be numbers'):
    cohort_training.stack_cohort(
      [(np.zeros((1, 3)), np.array(['a']))], batch_size=2, label_task='regression'
    )
