"""The cohort engine computes what the per-client engine computes.

The reference trains each client alone with TFF's own local update (the
`model_delta_client_work` / `proximal_client_work` functions fedpipe's
`client_work` runs, in a graph as a TFF computation runs them) on a `tf.data`
dataset batched as `client_data` batches (repeat, then batch), then sums the
updates through fedpipe's DP query
(`dp_aggregator.CappedWeightSumQuery` over TensorFlow Privacy's adaptive-clip
query, noise off). The cohort engine must give the same clipped, weighted sum,
total weight, below-clip count and metrics within 1e-5 relative.
"""

import collections
import functools

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
import tensorflow_privacy as tfp

from fedpipe.computations import cohort_training, dp_aggregator, keras_model, proximal_optimizer

NUM_CLASSES = 3
BATCH_SIZE = 4
LEARNING_RATE = 0.1
WEIGHT_CAP = 10.0
RTOL = 1e-5
SIZES = {'equal': [8] * 6, 'skewed': [1, 3, 17, 40, 0, 5]}  # An empty client is all padding.


def _mlp():
  return keras_model.build_mlp(num_features=6, num_classes=NUM_CLASSES, hidden_units=(5,), seed=1)


def _conv():
  inputs = tf.keras.Input(shape=(16,), name='x')
  x = tf.keras.layers.Reshape((4, 4, 1))(inputs)
  x = tf.keras.layers.Conv2D(2, 3, activation='relu', name='conv')(x)
  x = tf.keras.layers.Flatten()(x)
  logits = tf.keras.layers.Dense(NUM_CLASSES, name='logits')(x)
  return tf.keras.Model(inputs, logits, name='convnet')


def _batch_norm():
  inputs = tf.keras.Input(shape=(6,), name='x')
  x = tf.keras.layers.BatchNormalization(name='bn')(inputs)
  return tf.keras.Model(inputs, tf.keras.layers.Dense(NUM_CLASSES)(x))


MODELS = {'mlp': (_mlp, 6), 'conv': (_conv, 16)}


@functools.cache
def _functional(model: str):
  builder, num_features = MODELS[model]
  return cohort_training.functional_model_from_builder(builder, num_features=num_features)


class _Reference:
  """TFF's local update of one client, in a graph, as a TFF computation runs it.

  The update is the function fedpipe's `client_work` calls
  (`model_delta_client_work`, with FedProx's `proximal_optimizer`), on a
  client dataset batched as `client_data` batches (repeat, then batch).
  """

  def __init__(self, model: str, proximal_strength: float, momentum: float | None):
    builder, num_features = MODELS[model]
    trainable, non_trainable = _functional(model).initial_weights
    optimizer = tff.learning.optimizers.build_sgdm(learning_rate=LEARNING_RATE, momentum=momentum)
    weighting = tff.learning.ClientWeighting.NUM_EXAMPLES
    loop = tff.learning.LoopImplementation.DATASET_REDUCE
    self._graph = tf.Graph()
    with self._graph.as_default():
      created = []

      def model_fn():
        created.append(keras_model.build_model_fn(builder, num_features=num_features)())
        return created[-1]

      if proximal_strength > 0:
        optimizer = proximal_optimizer.ProximalOptimizer(optimizer, proximal_strength)
      update = tff.learning.templates.model_delta_client_work
      update = update.build_model_delta_update_with_tff_optimizer(
        model_fn=model_fn, weighting=weighting, loop_implementation=loop
      )
      hparams = optimizer.get_hparams(optimizer.initialize(tf.TensorSpec([], tf.float32)))
      update = functools.partial(update, optimizer, optimizer_hparams=hparams)
      tff_model = created[0]
      assert [v.shape for v in tff_model.trainable_variables] == [w.shape for w in trainable]
      weights = tff.learning.models.ModelWeights(
        trainable=[tf.constant(w) for w in trainable],
        non_trainable=[tf.constant(w) for w in non_trainable],
      )
      self._x = tf.compat.v1.placeholder(tf.float32, [None, num_features])
      self._y = tf.compat.v1.placeholder(tf.int64, [None])
      self._epochs = tf.compat.v1.placeholder(tf.int64, [])
      data = tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=self._x, y=self._y))
      result, metrics = update(
        initial_weights=weights, data=data.repeat(self._epochs).batch(BATCH_SIZE)
      )
      self._fetches = (result.update, result.update_weight, metrics)
      # The model's metrics sum over the clients trained since the last reset.
      self._reset_metrics = tf.compat.v1.variables_initializer(tff_model.local_variables)
      init = [tf.compat.v1.global_variables_initializer(), self._reset_metrics]
    self._session = tf.compat.v1.Session(graph=self._graph)
    self._session.run(init)

  def __call__(self, clients, *, epochs):
    """Per-client updates and weights, and the metrics summed over the clients."""
    self._session.run(self._reset_metrics)
    deltas, client_weights = [], []
    for x, y in clients:
      feed = {self._x: x, self._y: y, self._epochs: epochs}
      update, weight, metrics = self._session.run(self._fetches, feed_dict=feed)
      deltas.append(list(update))
      client_weights.append(float(weight))
    return deltas, client_weights, {k: [float(v) for v in vs] for k, vs in metrics.items()}


_reference = functools.cache(_Reference)


@functools.cache
def _runner(model: str, proximal_strength: float, momentum: float | None):
  return cohort_training.CohortRunner(
    _functional(model),
    learning_rate=LEARNING_RATE,
    momentum=momentum,
    proximal_strength=proximal_strength,
    clip_norm=1.0,  # Each call passes its own.
    weight_cap=WEIGHT_CAP,
    fallback_to_while_loop=model == 'conv',  # Conv2D with per-client filters needs it.
  )


def _clients(sizes, num_features, seed=0):
  rng = np.random.default_rng(seed)
  return [
    (
      rng.normal(size=(n, num_features)).astype(np.float32),
      rng.integers(0, NUM_CLASSES, size=n).astype(np.int64),
    )
    for n in sizes
  ]


def _dp_sum(deltas, client_weights, clip_norm):
  """Σ w_k clip(Δ_k) and the below-clip count, through fedpipe's DP query with noise off."""
  query = dp_aggregator.CappedWeightSumQuery(
    tfp.QuantileAdaptiveClipSumQuery(
      initial_l2_norm_clip=clip_norm,
      noise_multiplier=0.0,
      target_unclipped_quantile=0.5,
      learning_rate=0.2,
      clipped_count_stddev=0.0,
      expected_num_records=len(deltas),
      geometric_update=True,
    )
  )
  params = query.derive_sample_params(query.initial_global_state())
  state = query.initial_sample_state({'update': deltas[0], 'weight': 0.0})
  weight_sum = 0.0
  for delta, weight in zip(deltas, client_weights):
    capped = tf.minimum(tf.cast(weight, tf.float32) / WEIGHT_CAP, 1.0)  # As the factory does.
    state = query.accumulate_record(params, state, {'update': delta, 'weight': capped})
    weight_sum += float(capped)
  below = float(state.quantile_estimator_state) + 0.5 * len(deltas)  # Counts are shifted by 0.5.
  return [s.numpy() for s in state.sum_state], weight_sum, round(below)


def _assert_close(actual, expected):
  """Equal within RTOL relative to the whole structure's scale; returns the relative error."""
  scale = max(np.abs(e).max() for e in expected)
  error = max(np.abs(a - e).max() for a, e in zip(actual, expected)) / scale
  assert error <= RTOL, f'relative error {error:.2e}'
  return error


def _middle_clip(deltas):
  """A clip norm between the middle update norms: some clients clipped, some not."""
  norms = sorted(np.sqrt(sum(float((d**2).sum()) for d in delta)) for delta in deltas)
  return float((norms[len(norms) // 2 - 1] + norms[len(norms) // 2]) / 2)


@pytest.mark.parametrize('proximal_strength', [0.0, 0.5], ids=['fedavg', 'fedprox'])
@pytest.mark.parametrize('epochs', [1, 3])
@pytest.mark.parametrize('sizes', sorted(SIZES))
@pytest.mark.parametrize('model', sorted(MODELS))
def test_cohort_aggregate_equals_the_per_client_engines(model, sizes, epochs, proximal_strength):
  clients = _clients(SIZES[sizes], MODELS[model][1])
  deltas, client_weights, metrics = _reference(model, proximal_strength, None)(
    clients, epochs=epochs
  )
  clip_norm = _middle_clip(deltas)
  expected_sum, expected_weight, expected_below = _dp_sum(deltas, client_weights, clip_norm)

  cohort = cohort_training.stack_cohort(clients, batch_size=BATCH_SIZE, epochs=epochs)
  result = _runner(model, proximal_strength, None)(
    _functional(model).initial_weights, cohort, clip_norm=clip_norm
  )

  _assert_close(result.update_sum, expected_sum)
  assert result.weight_sum == pytest.approx(expected_weight, rel=RTOL)
  assert result.below_clip_count == expected_below == len(clients) // 2
  assert result.num_clients == len(clients)
  actual_metrics = cohort_training.unfinalized_metrics(result)
  assert actual_metrics.keys() == metrics.keys()
  for name, values in metrics.items():
    np.testing.assert_allclose(actual_metrics[name], values, rtol=RTOL)
  assert result.num_examples == sum(SIZES[sizes]) * epochs


def test_client_momentum_matches_build_sgdm():
  clients = _clients(SIZES['skewed'], 6, seed=1)
  deltas, client_weights, metrics = _reference('mlp', 0.5, 0.9)(clients, epochs=3)
  clip_norm = _middle_clip(deltas)
  expected_sum, expected_weight, expected_below = _dp_sum(deltas, client_weights, clip_norm)

  cohort = cohort_training.stack_cohort(clients, batch_size=BATCH_SIZE, epochs=3)
  result = _runner('mlp', 0.5, 0.9)(_functional('mlp').initial_weights, cohort, clip_norm=clip_norm)

  _assert_close(result.update_sum, expected_sum)
  assert result.weight_sum == pytest.approx(expected_weight, rel=RTOL)
  assert result.below_clip_count == expected_below
  assert result.loss_sum == pytest.approx(metrics['loss'][0], rel=RTOL)


def test_a_non_finite_client_contributes_nothing_as_in_tff():
  # Infinite features make the client's update NaN: TFF zeroes it, gives it
  # weight 0 and drops its metrics (FedAvg's client work).
  clients = _clients([5, 9, 3], 6, seed=2)
  clients[0][0][2, 1] = np.inf
  deltas, client_weights, metrics = _reference('mlp', 0.0, None)(clients, epochs=1)
  assert client_weights[0] == 0.0
  expected_sum, expected_weight, _ = _dp_sum(deltas, client_weights, clip_norm=1.0)

  cohort = cohort_training.stack_cohort(clients, batch_size=BATCH_SIZE)
  result = _runner('mlp', 0.0, None)(_functional('mlp').initial_weights, cohort, clip_norm=1.0)

  _assert_close(result.update_sum, expected_sum)
  assert result.weight_sum == pytest.approx(expected_weight, rel=RTOL)
  assert result.num_examples == metrics['num_examples'][0] == 12
  assert result.loss_sum == pytest.approx(metrics['loss'][0], rel=RTOL)


def test_padded_steps_and_examples_change_nothing():
  # Momentum and FedProx on: a padded step that ran the optimizer would move
  # the weights even at zero gradient.
  clients = _clients([1, 6, 11], 6, seed=3)
  cohort = cohort_training.stack_cohort(clients, batch_size=BATCH_SIZE, epochs=2)
  rng = np.random.default_rng(4)
  extra = 3  # Steps that are padding for every client.
  k, steps, width = cohort.mask.shape
  x = rng.normal(scale=3.0, size=(k, steps + extra, width, 6)).astype(np.float32)
  y = rng.integers(0, NUM_CLASSES, size=(k, steps + extra, width))
  mask = np.zeros((k, steps + extra, width), np.float32)
  real = cohort.mask > 0
  x[:, :steps][real], y[:, :steps][real], mask[:, :steps][real] = cohort.x[real], cohort.y[real], 1
  padded = cohort_training.StackedCohort(x, y, mask, cohort.num_examples, cohort.num_steps)
  runner = _runner('mlp', 0.5, 0.9)
  weights = _functional('mlp').initial_weights

  clean, noisy = runner(weights, cohort, clip_norm=0.5), runner(weights, padded, clip_norm=0.5)

  for a, b in zip(clean.update_sum, noisy.update_sum):
    np.testing.assert_array_equal(a, b)
  for field in ('weight_sum', 'below_clip_count', 'loss_sum', 'accuracy_count', 'num_batches'):
    assert getattr(clean, field) == getattr(noisy, field), field


def test_removing_one_user_moves_the_cohort_sum_by_at_most_the_clip():
  """The one-user sensitivity, under the cohort engine: |sum(D) - sum(D without k)| <= clip.

  Each user's summand is its clipped update times its capped weight (<= 1),
  whatever the other users of its cohort are; an extreme user (features 30
  times the others', many examples) reaches the bound.
  """
  clip = 0.5
  clients = _clients([1, 3, 17, 40, 5, 60], 6, seed=8)
  clients[5] = (clients[5][0] * 30.0, clients[5][1])
  runner = _runner('mlp', 0.0, None)
  weights = _functional('mlp').initial_weights

  def cohort_sum(members):
    cohort = cohort_training.stack_cohort(members, batch_size=BATCH_SIZE)
    result = runner(weights, cohort, clip_norm=clip)
    return np.concatenate([np.ravel(u) for u in result.update_sum])

  full = cohort_sum(clients)
  moves = [
    float(np.linalg.norm(full - cohort_sum(clients[:k] + clients[k + 1 :])))
    for k in range(len(clients))
  ]
  assert max(moves) <= clip * (1 + 1e-5), moves
  assert moves[5] >= 0.99 * clip, moves  # The extreme user, above the cap, reaches it.


def test_the_unvectorized_path_computes_the_same():
  clients = _clients(SIZES['skewed'], 6, seed=5)
  cohort = cohort_training.stack_cohort(clients, batch_size=BATCH_SIZE, epochs=2)
  sequential = cohort_training.CohortRunner(
    _functional('mlp'),
    learning_rate=LEARNING_RATE,
    clip_norm=0.5,
    weight_cap=WEIGHT_CAP,
    vectorize=False,
  )
  weights = _functional('mlp').initial_weights

  expected = _runner('mlp', 0.0, None)(weights, cohort, clip_norm=0.5)
  actual = sequential(weights, cohort)

  _assert_close(actual.update_sum, expected.update_sum)
  assert actual.below_clip_count == expected.below_clip_count


@pytest.mark.parametrize('span', [True, False])
def test_stacking_reproduces_the_datasets_batches(span):
  sizes, epochs = [0, 1, 5, 2], 3
  clients = _clients(sizes, 2, seed=6)
  cohort = cohort_training.stack_cohort(
    clients, batch_size=2, epochs=epochs, batches_span_epochs=span
  )

  for k, (x, y) in enumerate(clients):
    data = tf.data.Dataset.from_tensor_slices((x, y))
    data = data.repeat(epochs).batch(2) if span else data.batch(2).repeat(epochs)
    batches = list(data.as_numpy_iterator())
    assert cohort.num_steps[k] == len(batches)
    for s, (bx, by) in enumerate(batches):
      n = len(by)
      np.testing.assert_array_equal(cohort.x[k, s, :n], bx)
      np.testing.assert_array_equal(cohort.y[k, s, :n], by)
      assert cohort.mask[k, s].sum() == n
    assert cohort.mask[k, len(batches) :].sum() == 0
  np.testing.assert_array_equal(cohort.num_examples, np.array(sizes) * epochs)
  assert cohort.padding_fraction == pytest.approx(1 - sum(sizes) * epochs / cohort.mask.size)


def test_the_batch_dimension_shrinks_to_the_largest_real_batch():
  cohort = cohort_training.stack_cohort(_clients([1, 3, 2], 2), batch_size=16)
  assert cohort.x.shape == (3, 1, 3, 2)
  assert cohort.padding_fraction == pytest.approx(1 - 6 / 9)


def test_shuffling_permutes_each_epoch():
  x = np.arange(6, dtype=np.float32)[:, None]
  cohort = cohort_training.stack_cohort(
    [(x, np.zeros(6, np.int64))], batch_size=6, epochs=2, shuffle_seed=0
  )
  for step in range(2):
    assert sorted(cohort.x[0, step, :, 0]) == list(range(6))
  assert not np.array_equal(cohort.x[0, 0], cohort.x[0, 1])


def test_batch_normalization_is_refused_naming_the_layer():
  with pytest.raises(
    cohort_training.CohortNotVectorizableError, match=r'\(bn\).*GroupNormalization'
  ):
    cohort_training.functional_model_from_builder(_batch_norm, num_features=6)


def test_a_stateful_layer_in_a_functional_model_is_refused():
  # Built by TFF from a builder function, whose layers it does not check.
  model = tff.learning.models.functional_model_from_keras(
    _batch_norm,
    loss_fn=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    input_spec=(tf.TensorSpec([None, 6]), tf.TensorSpec([None], tf.int64)),
  )
  with pytest.raises(cohort_training.CohortNotVectorizableError, match='BatchNormalization'):
    cohort_training.CohortRunner(model, learning_rate=0.1)


def test_an_op_pfor_cannot_vectorize_is_named_with_its_layer():
  with pytest.raises(
    cohort_training.CohortNotVectorizableError,
    match=r"Conv2D op \(layer 'conv'\).*fallback_to_while_loop=True",
  ):
    cohort_training.CohortRunner(_functional('conv'), learning_rate=0.1)


def test_regularization_losses_are_refused():
  def regularized():
    inputs = tf.keras.Input(shape=(6,), name='x')
    dense = tf.keras.layers.Dense(3, kernel_regularizer='l2', name='dense_l2')
    return tf.keras.Model(inputs, dense(inputs))

  with pytest.raises(cohort_training.CohortNotVectorizableError, match='dense_l2'):
    cohort_training.functional_model_from_builder(regularized, num_features=6)


def test_training_eagerly_is_refused():
  cohort = cohort_training.stack_cohort(_clients([2], 6), batch_size=2)
  model = _functional('mlp')
  with pytest.raises(cohort_training.CohortTrainingError, match='tff.tensorflow.computation'):
    cohort_training.train_cohort(
      model, model.initial_weights, cohort.x, cohort.y, cohort.mask, learning_rate=0.1
    )


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(learning_rate=-1.0), 'learning_rate'),
    (dict(learning_rate=0.1, momentum=1.5), 'momentum'),
    (dict(learning_rate=0.1, proximal_strength=-0.1), 'proximal_strength'),
    (dict(learning_rate=0.1, clip_norm=0.0), 'clip_norm'),
    (dict(learning_rate=0.1, weight_cap=0.0), 'weight_cap'),
  ],
)
def test_bad_hyperparameters_are_named(kwargs, match):
  with pytest.raises(cohort_training.CohortTrainingError, match=match):
    cohort_training.CohortRunner(_functional('mlp'), **kwargs)


@pytest.mark.parametrize(
  'clients, kwargs, match',
  [
    ([], {}, 'at least one client'),
    ([(np.zeros((3, 2)), np.zeros(2, np.int64))], {}, 'client 0'),
    (
      [(np.zeros((1, 2)), np.zeros(1, np.int64)), (np.zeros((1, 3)), np.zeros(1, np.int64))],
      {},
      'client 1',
    ),
    ([(np.zeros((1, 2)), np.zeros(1, np.float32))], {}, 'integer class ids'),
    ([(np.zeros((1, 2)), np.zeros(1, np.int64))], {'epochs': 0}, 'epochs'),
  ],
)
def test_bad_client_data_is_named(clients, kwargs, match):
  with pytest.raises(cohort_training.CohortTrainingError, match=match):
    cohort_training.stack_cohort(clients, batch_size=2, **kwargs)
