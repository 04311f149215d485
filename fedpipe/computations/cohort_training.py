"""Local training of a whole cohort of clients at once, vectorized over the clients.

TFF runs each client's local training as its own computation, and its
executor pays a fixed cost per call. The cohort engine instead stacks K
clients' batches into padded tensors and trains all K models in one
TensorFlow computation: a `tf.while_loop` over local steps whose body runs one
SGD step of every client at once (`tf.vectorized_map` over TFF's functional
model, whose `predict_on_batch(weights, x)` is a pure function of the
weights). It returns what DP-FedAvg's aggregator needs from the cohort, the
sum of capped-weight, clipped updates, never the individual updates:

    w_k = min(n_k / weight_cap, 1)     Δ_k = initial weights − trained weights
    update_sum = Σ_k w_k · clip(Δ_k, S)      weight_sum = Σ_k w_k

The math is TFF's per-client engine's (`model_delta_client_work` and
`proximal_optimizer` with `build_sgdm`, as `client_work` runs them, then
`dp_aggregator.CappedWeightSumQuery`):

- a batch's loss is the model's loss averaged over its real examples (a last
  partial batch is a smaller batch); padded examples and padded steps leave a
  client's weights, optimizer state and metrics exactly unchanged;
- n_k counts the examples processed, epochs included;
- FedProx adds `proximal_strength * (current − initial)` to each gradient,
  as `proximal_optimizer.ProximalOptimizer` does (TFF 0.87's own proximal
  client work has the opposite sign);
- a client whose update has a non-finite value contributes a zero update and
  weight 0 (and, without FedProx, no metrics);
- the clip is joint over all trainable tensors (`tf.clip_by_global_norm`), and
  `below_clip_count` counts the unclipped norms at or below the clip norm, as
  TensorFlow Privacy's quantile estimator does for adaptive clipping.

The loss and metrics follow the label task, as `keras_model.loss_and_metrics`
gives them to the per-client engine's model, and the metric sums have the
layout that model reports unfinalized (`unfinalized_metrics`):

- 'multiclass': the functional model's sparse categorical cross-entropy;
  `accuracy` counts argmax hits;
- 'binary': binary cross-entropy from the one logit; `accuracy` counts
  `(logit > 0) == label` (Keras's `BinaryAccuracy(threshold=0)`), and `auc`
  holds Keras's `AUC` variables, true/false positives/negatives at its
  evenly spaced thresholds (-ε, 1/(T-1), ..., (T-2)/(T-1), 1+ε), counted
  with the bucketing of the sigmoid that Keras's AUC uses for such thresholds;
- 'regression': mean squared error; `rmse` sums the squared errors over the
  examples, and `mae` the batches' mean absolute errors over the batches
  (Keras's `MeanAbsoluteError` averages within a batch first).

Binary and regression losses are computed here from the model's output, the
same math as the Keras losses (which reduce a `[B, 1]` output against `[B]`
labels over the batch axis first, so the padding mask cannot be their sample
weight). Each client's metric sums are kept apart during training, so that a
non-finite client's are dropped as TFF drops them.

TFF's functional model only runs inside a graph: call `train_cohort` inside a
`tff.tensorflow.computation` or a `tf.Graph` (`CohortRunner` does the latter).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedpipe.computations import client_data, keras_model
from fedpipe.data import record_schema
from fedpipe.errors import FedpipeError

FunctionalModel = tff.learning.models.FunctionalModel
MULTICLASS, BINARY, REGRESSION = (
  record_schema.MULTICLASS,
  record_schema.BINARY,
  record_schema.REGRESSION,
)


class CohortTrainingError(FedpipeError, ValueError):
  """A cohort-training argument is invalid; the message names it and the fix."""


class CohortNotVectorizableError(FedpipeError, ValueError):
  """The cohort engine cannot train this model for all clients at once; the message says why."""


@dataclasses.dataclass(frozen=True)
class StackedCohort:
  """K clients' local batches, padded to common shapes.

  Attributes:
    x: Features, shape `[K, steps, batch, *feature_shape]`, float32.
    y: Labels, shape `[K, steps, batch]`, int64 (float32 for regression).
    mask: 1.0 for a real example, 0.0 for padding, shape `[K, steps, batch]`.
    num_examples: Examples each client processes (its size times the epochs), shape `[K]`.
    num_steps: Local steps (batches) of each client, shape `[K]`.
  """

  x: np.ndarray
  y: np.ndarray
  mask: np.ndarray
  num_examples: np.ndarray
  num_steps: np.ndarray

  @property
  def num_clients(self) -> int:
    return int(self.mask.shape[0])

  @property
  def padding_fraction(self) -> float:
    """The fraction of the stacked example slots that are padding (computed on, then discarded)."""
    return 1.0 - float(self.mask.sum()) / self.mask.size if self.mask.size else 0.0


def _client_order(n: int, epochs: int, rng: np.random.Generator | None) -> list[np.ndarray]:
  """Each epoch's example order: data order, or a fresh permutation per epoch."""
  return [rng.permutation(n) if rng is not None else np.arange(n) for _ in range(epochs)]


def stack_cohort(
  clients: Sequence[tuple[Any, Any]],
  *,
  batch_size: int,
  epochs: int = 1,
  batches_span_epochs: bool = True,
  shuffle_seed: int | None = None,
  label_task: str = MULTICLASS,
) -> StackedCohort:
  """Stacks clients' examples into the padded batches `train_cohort` takes.

  The batch order is the per-client engine's: `client_data.make_dataset_fn`
  repeats a client's examples `epochs` times, then batches, so a batch can
  span two epochs and a client takes `ceil(n * epochs / batch_size)` steps
  (`batches_span_epochs=True`); a dataset batched before repeating takes
  `ceil(n / batch_size) * epochs` steps, with a partial batch ending each
  epoch (`False`). The batch dimension is `batch_size`, or less when no
  client fills a batch (padding that no client uses is dropped).

  Args:
    clients: Each client's `(features, labels)`: features of shape
      `[n_k, *feature_shape]`, labels of shape `[n_k]` (integers, or numbers
      for 'regression'); n_k may be 0.
    batch_size: Examples per local batch.
    epochs: Passes over each client's examples.
    batches_span_epochs: See above.
    shuffle_seed: None keeps each client's data order in every epoch (the
      per-client engine with `shuffle=False`); a seed draws a new permutation
      per client and epoch (TF's own shuffle order cannot be reproduced).
    label_task: 'multiclass' or 'binary' (int64 labels) or 'regression'
      (float32 labels).

  Returns:
    A `StackedCohort`.

  Raises:
    CohortTrainingError: If there are no clients, `batch_size` or `epochs` is
      not a positive integer, labels are not integers (numbers for
      'regression'), or clients' features and labels disagree in length or
      shape.
  """
  task = record_schema.check_label_task(label_task)
  label_dtype = np.float32 if task == REGRESSION else np.int64
  for name, value in (('batch_size', batch_size), ('epochs', epochs)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise CohortTrainingError(f'{name} must be a positive integer, got {value!r}')
  if not clients:
    raise CohortTrainingError('stack_cohort needs at least one client, got none')
  arrays = []
  for k, (features, labels) in enumerate(clients):
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels)
    if labels.ndim != 1 or features.ndim < 1 or features.shape[0] != labels.shape[0]:
      raise CohortTrainingError(
        f'client {k}: features of shape {features.shape} and labels of shape {labels.shape} '
        'do not match; pass features [n, ...] and labels [n] for the same n examples'
      )
    if task == REGRESSION:
      if labels.size and not np.issubdtype(labels.dtype, np.number):
        raise CohortTrainingError(
          f'client {k}: regression labels must be numbers, got dtype {labels.dtype}'
        )
    elif labels.size and not np.issubdtype(labels.dtype, np.integer):
      raise CohortTrainingError(
        f'client {k}: labels must be integer class ids, got dtype {labels.dtype}'
      )
    arrays.append((features, labels.astype(label_dtype)))
  feature_shape = arrays[0][0].shape[1:]
  for k, (features, _) in enumerate(arrays):
    if features.shape[1:] != feature_shape:
      raise CohortTrainingError(
        f'client {k}: features of shape {features.shape[1:]} per example differ from client '
        f"0's {feature_shape}; every client needs the same feature shape"
      )

  rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
  batches_per_client = []
  for _, labels in arrays:
    orders = _client_order(labels.shape[0], epochs, rng)
    if batches_span_epochs:
      order = np.concatenate(orders)
      batches = [order[i : i + batch_size] for i in range(0, order.size, batch_size)]
    else:
      batches = [o[i : i + batch_size] for o in orders for i in range(0, o.size, batch_size)]
    batches_per_client.append(batches)

  num_clients = len(arrays)
  num_steps = np.array([len(b) for b in batches_per_client], np.int32)
  max_steps = int(num_steps.max())
  width = max((len(b) for batches in batches_per_client for b in batches), default=1)
  x = np.zeros((num_clients, max_steps, width, *feature_shape), np.float32)
  y = np.zeros((num_clients, max_steps, width), label_dtype)
  mask = np.zeros((num_clients, max_steps, width), np.float32)
  for k, ((features, labels), batches) in enumerate(zip(arrays, batches_per_client)):
    for s, index in enumerate(batches):
      x[k, s, : index.size] = features[index]
      y[k, s, : index.size] = labels[index]
      mask[k, s, : index.size] = 1.0
  num_examples = np.array([labels.shape[0] * epochs for _, labels in arrays], np.int64)
  return StackedCohort(x=x, y=y, mask=mask, num_examples=num_examples, num_steps=num_steps)


class CohortResult(NamedTuple):
  """What a cohort's local training contributes to a DP-FedAvg round.

  Attributes:
    update_sum: Σ_k w_k · clip(Δ_k, S), a list shaped like the trainable weights.
    weight_sum: Σ_k w_k, the capped weights (raw example counts without a cap).
    below_clip_count: Clients whose unclipped update norm is at most the clip
      norm (all clients without a clip norm).
    num_clients: K, the clients stacked (empty ones included).
    loss_sum: Σ over batches of the batch's mean loss times its examples
      (TFF's unfinalized `loss` total).
    accuracy_count: Examples predicted right (TFF's unfinalized `accuracy`
      total; 0 for 'regression').
    num_examples: Examples processed (TFF's `num_examples` metric; also the
      `loss` and `accuracy` counts).
    num_batches: Local steps taken (TFF's `num_batches` metric).
    task_metrics: The label task's other metrics, unfinalized as the
      per-client engine's model reports them: `{}` for 'multiclass',
      `{'auc': [true_positives, true_negatives, false_positives,
      false_negatives]}` for 'binary', `{'mae': [total, count], 'rmse':
      [total, count]}` for 'regression'.
  """

  update_sum: list
  weight_sum: Any
  below_clip_count: Any
  num_clients: Any
  loss_sum: Any
  accuracy_count: Any
  num_examples: Any
  num_batches: Any
  task_metrics: dict[str, list]


def _check_hyperparameters(
  learning_rate: float,
  momentum: float | None,
  proximal_strength: float,
  clip_norm: float | None,
  weight_cap: float | None,
) -> None:
  def number(value) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)

  if not number(learning_rate) or learning_rate < 0:
    raise CohortTrainingError(f'learning_rate must be a number >= 0, got {learning_rate!r}')
  if momentum is not None and (not number(momentum) or not 0 <= momentum <= 1):
    raise CohortTrainingError(f'momentum must be None or in [0, 1], got {momentum!r}')
  if not number(proximal_strength) or proximal_strength < 0:
    raise CohortTrainingError(
      f'proximal_strength must be a number >= 0 (0: FedAvg), got {proximal_strength!r}'
    )
  if clip_norm is not None and not tf.is_tensor(clip_norm):
    if not number(clip_norm) or not clip_norm > 0:
      raise CohortTrainingError(f'clip_norm must be None or > 0, got {clip_norm!r}')
  if weight_cap is not None and (not number(weight_cap) or not weight_cap > 0):
    raise CohortTrainingError(f'weight_cap must be None or > 0, got {weight_cap!r}')


def _require_graph() -> None:
  with tf.init_scope():
    eager = tf.executing_eagerly()
  if eager:
    raise CohortTrainingError(
      "train_cohort builds graph ops for TFF's functional model, which runs only in a graph: "
      'call it inside a tff.tensorflow.computation or a tf.Graph, or use CohortRunner'
    )


@contextlib.contextmanager
def _quiet_tensorflow_logger() -> Iterator[None]:
  """pfor logs every op it fails to convert at ERROR level; the raised error says it once."""
  logger = logging.getLogger('tensorflow')
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


_OP_TYPE_PATTERNS = (
  re.compile(r"of op '(\w+)' expected to be loop invariant"),
  re.compile(r'No pfor vectorization defined for (\w+)'),
)


def _failing_op(message: str) -> str | None:
  for pattern in _OP_TYPE_PATTERNS:
    found = pattern.search(message)
    if found:
      return found.group(1)
  return None


def _last_line(error: Exception) -> str:
  """The innermost message of a (possibly traced-function-wrapped) error."""
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def _layers_with_op(
  functional_model: FunctionalModel, initial_weights: Any, op_type: str
) -> list[str]:
  """Name scopes (Keras layers) of the ops of `op_type` in the model's forward pass.

  Traced again in a scratch graph: the failed trace's functions were never
  added to a graph's library.
  """
  trainable, non_trainable = initial_weights
  spec = functional_model.input_spec
  features_spec = spec['x'] if isinstance(spec, dict) else spec[0]
  try:
    with tf.Graph().as_default() as graph:
      weights = (
        [tf.compat.v1.placeholder(w.dtype, w.shape) for w in trainable],
        [tf.compat.v1.placeholder(w.dtype, w.shape) for w in non_trainable],
      )
      x = tf.compat.v1.placeholder(features_spec.dtype, features_spec.shape)
      functional_model.predict_on_batch(weights, x, training=True)
      graph_def = graph.as_graph_def()
  except Exception:  # Naming the layer is best effort.
    return []
  nodes = list(graph_def.node)
  for function in graph_def.library.function:
    nodes.extend(function.node_def)
  scopes = [node.name.split('/') for node in nodes if node.op == op_type]
  return sorted({parts[-2] for parts in scopes if len(parts) > 1})


def _not_vectorizable(
  error: Exception, functional_model: FunctionalModel, initial_weights: Any
) -> CohortNotVectorizableError:
  op_type = _failing_op(' '.join(str(error).split()))
  if op_type is None:
    return CohortNotVectorizableError(
      f'tf.vectorized_map cannot vectorize the local training step over clients '
      f'({_last_line(error)}); pass fallback_to_while_loop=True (the ops it cannot vectorize '
      'run client by client) or vectorize=False, or train with the per-client engine'
    )
  layers = _layers_with_op(functional_model, initial_weights, op_type)
  where = f' (layer {", ".join(repr(s) for s in layers)})' if layers else ''
  return CohortNotVectorizableError(
    f"the model's {op_type} op{where} has no vectorized form over per-client weights in "
    "this TensorFlow's pfor, so tf.vectorized_map cannot train the clients at once; pass "
    'fallback_to_while_loop=True (that op then runs client by client inside each step: the '
    'same result, slower) or vectorize=False, or train with the per-client engine'
  )


def _stateful_layer_error(error: Exception) -> CohortNotVectorizableError:
  return CohortNotVectorizableError(
    'the model updates non-trainable state when called in training mode, as a '
    f"BatchNormalization layer does ({_last_line(error)}), and TFF's functional model "
    'cannot carry that state; use LayerNormalization or GroupNormalization, or train with '
    'the per-client engine'
  )


def _expand_to(t: tf.Tensor, rank: int) -> tf.Tensor:
  """`t` of shape [K] reshaped to broadcast against a tensor of `rank` with leading K."""
  return tf.reshape(t, tf.concat([tf.shape(t), tf.ones([rank - 1], tf.int32)], 0))


def example_losses(label_task: str, predictions: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
  """Each example's loss for 'binary' or 'regression', as the task's Keras loss computes it.

  Args:
    label_task: 'binary' (binary cross-entropy from the logit) or
      'regression' (squared error).
    predictions: The model's one output per example, any shape.
    labels: The labels, the shape of `predictions`.

  Returns:
    The losses, the shape of `predictions`; Keras's loss is their batch mean.
  """
  labels = tf.cast(labels, predictions.dtype)
  if label_task == BINARY:
    return tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=predictions)
  if label_task == REGRESSION:
    return tf.math.squared_difference(predictions, labels)
  raise CohortTrainingError(f'example_losses is for binary or regression, got {label_task!r}')


def prediction_sums(
  label_task: str, predictions: tf.Tensor, labels: tf.Tensor, mask: tf.Tensor
) -> dict[str, tf.Tensor]:
  """Each batch's metric sums over its real examples, for 'binary' or 'regression'.

  Args:
    label_task: 'binary' or 'regression'.
    predictions: The model's one output per example, `[R, B]`: R batches.
    labels: `[R, B]`.
    mask: 1.0 for a real example, 0.0 for padding, `[R, B]`.

  Returns:
    Per batch, shape `[R, ...]`: for 'binary' `correct` (Keras's
    `BinaryAccuracy(threshold=0)` hits), `positives` and `negatives` (`[R, T]`:
    real positive and negative examples by Keras AUC's threshold bucket of
    their sigmoid); for 'regression' `absolute_mean` (the batch's mean absolute
    error, 0 for an empty batch) and `squared` (the sum of squared errors).
  """
  labels = tf.cast(labels, predictions.dtype)
  if label_task == REGRESSION:
    absolute = tf.reduce_sum(mask * tf.abs(predictions - labels), axis=1)
    examples = tf.reduce_sum(mask, axis=1)
    return {
      'absolute_mean': absolute / tf.maximum(examples, 1.0),
      'squared': tf.reduce_sum(mask * tf.math.squared_difference(predictions, labels), axis=1),
    }
  if label_task != BINARY:
    raise CohortTrainingError(f'prediction_sums is for binary or regression, got {label_task!r}')
  hits = tf.cast(tf.equal(labels, tf.cast(predictions > 0.0, predictions.dtype)), tf.float32)
  # Keras AUC's bucket of each probability (its thresholds have the ±ε ends):
  # the example counts as positive at the thresholds of buckets <= its own.
  thresholds = keras_model.AUC_THRESHOLDS
  probabilities = tf.clip_by_value(tf.sigmoid(predictions), 0.0, 1.0)
  bucket = tf.cast(tf.nn.relu(tf.math.ceil(probabilities * (thresholds - 1)) - 1), tf.int32)
  # A non-finite output (its client's sums are dropped) must still index a bucket.
  bucket = tf.where(tf.math.is_finite(probabilities), tf.minimum(bucket, thresholds - 1), 0)
  rows = tf.shape(predictions)[0]
  segments = tf.reshape(tf.range(rows)[:, tf.newaxis] * thresholds + bucket, [-1])
  positive = tf.cast(tf.cast(labels, tf.bool), tf.float32)

  def by_bucket(weights: tf.Tensor) -> tf.Tensor:
    counts = tf.math.unsorted_segment_sum(tf.reshape(weights, [-1]), segments, rows * thresholds)
    return tf.reshape(counts, [rows, thresholds])

  return {
    'correct': tf.reduce_sum(mask * hits, axis=1),
    'positives': by_bucket(mask * positive),
    'negatives': by_bucket(mask * (1.0 - positive)),
  }


def task_metrics(
  label_task: str, sums: dict[str, tf.Tensor], *, num_examples: tf.Tensor, num_batches: tf.Tensor
) -> dict[str, list]:
  """`CohortResult.task_metrics` from `prediction_sums` summed over all batches.

  Args:
    label_task: The label task.
    sums: `prediction_sums`'s values summed over the batches (`positives`
      and `negatives` `[T]`); ignored for 'multiclass'.
    num_examples: The real examples (float32).
    num_batches: The batches with a real example (float32).
  """
  if label_task == BINARY:
    # Keras's cumulative counts: positive at threshold t if the bucket is >= t's.
    true_positives = tf.cumsum(sums['positives'], reverse=True)
    false_positives = tf.cumsum(sums['negatives'], reverse=True)
    return {
      'auc': [
        true_positives,
        tf.reduce_sum(sums['negatives']) - false_positives,
        false_positives,
        tf.reduce_sum(sums['positives']) - true_positives,
      ]
    }
  if label_task == REGRESSION:
    return {
      'mae': [sums['absolute_mean'], num_batches],
      'rmse': [sums['squared'], num_examples],
    }
  return {}


def train_cohort(
  functional_model: FunctionalModel,
  initial_weights: Any,
  x: tf.Tensor,
  y: tf.Tensor,
  mask: tf.Tensor,
  *,
  learning_rate: float,
  momentum: float | None = None,
  proximal_strength: float = 0.0,
  clip_norm: float | tf.Tensor | None = None,
  weight_cap: float | None = None,
  vectorize: bool = True,
  fallback_to_while_loop: bool = False,
  label_task: str = MULTICLASS,
) -> CohortResult:
  """Trains K clients from the same weights at once; returns their clipped, weighted sum.

  Every client runs `build_sgdm(learning_rate, momentum)` over its own
  batches, from `initial_weights`, as TFF's model-delta client work (or
  FedProx's proximal client work) would; see the module docstring for the
  exact semantics. Graph mode only (a `tff.tensorflow.computation` or a
  `tf.Graph`).

  Args:
    functional_model: A `tff.learning.models.FunctionalModel` (e.g. from
      `functional_model_from_builder`). For 'multiclass' its loss must
      average over the batch (Keras's default reduction), as fedpipe's
      models' does; for 'binary' and 'regression' the task's loss is used.
    initial_weights: The global model, `(trainable, non_trainable)` as the
      functional model's `initial_weights`.
    x: Features, `[K, steps, batch, *feature_shape]` (`StackedCohort.x`).
    y: Labels, `[K, steps, batch]`.
    mask: 1 for a real example, 0 for padding, `[K, steps, batch]`.
    learning_rate: The client optimizer's learning rate.
    momentum: The client optimizer's momentum; None or 0: plain SGD (as
      `build_sgdm`).
    proximal_strength: FedProx's μ; 0 trains plain FedAvg updates.
    clip_norm: The L2 norm S each client's update is clipped to, jointly over
      all trainable tensors (a float, or a scalar tensor for adaptive
      clipping); None: no clipping.
    weight_cap: Examples processed at which a client's weight reaches 1
      (w_k = min(n_k / weight_cap, 1)); None: w_k = n_k.
    vectorize: False runs the clients one after another in each step
      (`tf.map_fn`), with the same math.
    fallback_to_while_loop: Let `tf.vectorized_map` run ops it cannot
      vectorize client by client (e.g. Conv2D with per-client filters)
      instead of raising.
    label_task: 'multiclass', 'binary' (a one-logit model) or 'regression'
      (a one-output model, float labels): the loss and metrics (see the
      module docstring).

  Returns:
    A `CohortResult` of tensors.

  Raises:
    CohortTrainingError: If called eagerly or a hyperparameter is out of range.
    record_schema.LabelTaskError: If `label_task` is not a label task.
    CohortNotVectorizableError: If the model updates state in training
      (BatchNormalization), or an op cannot be vectorized over clients and
      `fallback_to_while_loop` is off (the message names the op and layer).
  """
  _require_graph()
  _check_hyperparameters(learning_rate, momentum, proximal_strength, clip_norm, weight_cap)
  task = record_schema.check_label_task(label_task)
  initial_trainable, non_trainable = initial_weights
  initial_trainable = tuple(tf.convert_to_tensor(w, tf.float32) for w in initial_trainable)
  non_trainable = [tf.convert_to_tensor(w) for w in non_trainable]
  x = tf.convert_to_tensor(x, tf.float32)
  y = tf.cast(tf.convert_to_tensor(y), tf.float32 if task == REGRESSION else tf.int64)
  mask = tf.cast(tf.convert_to_tensor(mask), tf.float32)
  use_momentum = bool(momentum)  # build_sgdm: None or 0 is plain SGD.
  lr = tf.constant(learning_rate, tf.float32)
  momentum_t = tf.constant(momentum if use_momentum else 0.0, tf.float32)
  mu = float(proximal_strength)

  num_clients = tf.shape(mask)[0]
  num_steps = tf.shape(mask)[1]
  width = tf.cast(tf.shape(mask)[2], tf.float32)
  # Step-major, so that a step's batches of all clients are one slice.
  x_steps = tf.transpose(x, tf.concat([[1, 0], tf.range(2, tf.rank(x))], 0))
  y_steps = tf.transpose(y, [1, 0, 2])
  mask_steps = tf.transpose(mask, [1, 0, 2])

  def client_step(args):
    weights, accumulators, xb, yb, mb = args
    n = tf.reduce_sum(mb)
    with tf.GradientTape() as tape:
      tape.watch(weights)
      output = functional_model.predict_on_batch((list(weights), non_trainable), xb, training=True)
      if task == MULTICLASS:
        # The model's loss over the real examples: Keras's mean-over-batch loss
        # with the mask as sample weight divides by the padded width; rescaled
        # to the mean over the real examples (a partial batch is a smaller batch).
        weighted = functional_model.loss(output=output, label=yb, sample_weight=mb)
        loss = weighted * (width / tf.maximum(n, 1.0))
      else:
        # The task's Keras loss, the mean over the batch's real examples.
        predictions = tf.reshape(tf.nest.flatten(output)[0], [-1])
        loss = tf.reduce_sum(mb * example_losses(task, predictions, yb)) / tf.maximum(n, 1.0)
    gradients = tape.gradient(loss, weights, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    if mu > 0:
      # FedProx's pull towards the round's model, as `proximal_optimizer` adds it.
      gradients = tuple(
        g + mu * (w - w0) for g, w0, w in zip(gradients, initial_trainable, weights)
      )
    if use_momentum:
      accumulators = tuple(momentum_t * a + g for a, g in zip(accumulators, gradients))
      new_weights = tuple(w - lr * a for w, a in zip(weights, accumulators))
    else:
      new_weights = tuple(w - lr * g for w, g in zip(weights, gradients))
    if task != MULTICLASS:
      # The metrics of the other tasks are computed for all clients at once.
      return new_weights, accumulators, loss, n, predictions
    predictions = tf.nest.flatten(output)[0]
    correct = tf.reduce_sum(mb * tf.cast(tf.equal(tf.argmax(predictions, axis=-1), yb), tf.float32))
    return new_weights, accumulators, loss, n, correct

  def step_all(weights, accumulators, xb, yb, mb):
    elems = (weights, accumulators, xb, yb, mb)
    if not vectorize:
      signature = (
        tuple(tf.TensorSpec(w.shape[1:], w.dtype) for w in weights),
        tuple(tf.TensorSpec(a.shape[1:], a.dtype) for a in accumulators),
        tf.TensorSpec([], tf.float32),
        tf.TensorSpec([], tf.float32),
        tf.TensorSpec([] if task == MULTICLASS else [None], tf.float32),
      )
      return tf.map_fn(client_step, elems, fn_output_signature=signature)
    return tf.vectorized_map(client_step, elems, fallback_to_while_loop=fallback_to_while_loop)

  def body(step, weights, accumulators, loss_sum, correct_sum, examples, batches, *sums):
    new_weights, new_accumulators, loss, n, correct = step_all(
      weights, accumulators, x_steps[step], y_steps[step], mask_steps[step]
    )
    active = n > 0  # A padded step changes nothing.
    if task != MULTICLASS:
      # The step returned the clients' predictions [K, B]: each client's sums.
      predictions = correct
      step_sums = prediction_sums(task, predictions, y_steps[step], mask_steps[step])
      correct = step_sums.pop('correct', tf.zeros_like(loss))
      sums = (
        {
          key: total + tf.where(_expand_to(active, total.shape.rank), step_sums[key], 0.0)
          for key, total in sums[0].items()
        },
      )
    if use_momentum or mu > 0:
      weights = tuple(
        tf.where(_expand_to(active, w.shape.rank), nw, w) for w, nw in zip(weights, new_weights)
      )
    else:
      # Plain SGD: a padded step's loss and gradient are exactly zero, so its
      # update leaves the weights bit for bit; skipping the select saves a
      # pass over every client's weights per step (the bulk of a step's cost).
      weights = new_weights
    accumulators = tuple(
      tf.where(_expand_to(active, a.shape.rank), na, a)
      for a, na in zip(accumulators, new_accumulators)
    )
    loss_sum += tf.where(active, loss * n, 0.0)
    correct_sum += tf.where(active, correct, 0.0)
    examples += tf.cast(n, tf.int64)
    batches += tf.cast(active, tf.int64)
    return (step + 1, weights, accumulators, loss_sum, correct_sum, examples, batches, *sums)

  stacked = tuple(
    tf.tile(w[tf.newaxis], [num_clients] + [1] * w.shape.rank) for w in initial_trainable
  )
  accumulators = tuple(tf.zeros_like(w) for w in stacked) if use_momentum else ()
  zeros_f = tf.zeros([num_clients], tf.float32)
  zeros_i = tf.zeros([num_clients], tf.int64)
  loop_vars = (tf.constant(0), stacked, accumulators, zeros_f, zeros_f, zeros_i, zeros_i)
  if task != MULTICLASS:
    # Each client's metric sums, so that a non-finite client's can be dropped.
    buckets = tf.zeros([num_clients, keras_model.AUC_THRESHOLDS], tf.float32)
    initial_sums = (
      {'positives': buckets, 'negatives': buckets}
      if task == BINARY
      else {'absolute_mean': zeros_f, 'squared': zeros_f}
    )
    loop_vars += (initial_sums,)
  try:
    with _quiet_tensorflow_logger():
      _, trained, _, loss_sum, correct_sum, examples, batches, *sums = tf.while_loop(
        lambda step, *_: step < num_steps, body, loop_vars, parallel_iterations=1
      )
  except AttributeError as e:
    if 'assign' in str(e):
      raise _stateful_layer_error(e) from e
    raise
  except ValueError as e:
    if vectorize and ('pfor' in str(e) or _failing_op(' '.join(str(e).split()))):
      raise _not_vectorizable(e, functional_model, initial_weights) from e
    raise

  # Δ_k = initial − trained, zeroed (with weight 0) if not finite, as TFF does.
  deltas = [w0[tf.newaxis] - w for w0, w in zip(initial_trainable, trained)]
  finite = tf.ones([num_clients], tf.bool)
  for d in deltas:
    finite &= tf.reduce_all(tf.math.is_finite(tf.reshape(d, [num_clients, -1])), axis=1)
  deltas = [tf.where(_expand_to(finite, d.shape.rank), d, tf.zeros_like(d)) for d in deltas]
  client_weights = tf.where(finite, tf.cast(examples, tf.float32), 0.0)
  # Model-delta client work resets a non-finite client's metrics.
  loss_sum = tf.where(finite, loss_sum, 0.0)
  correct_sum = tf.where(finite, correct_sum, 0.0)
  examples = tf.where(finite, examples, 0)
  batches = tf.where(finite, batches, 0)
  metrics = {}
  if task != MULTICLASS:
    totals = {
      key: tf.reduce_sum(tf.where(_expand_to(finite, total.shape.rank), total, 0.0), axis=0)
      for key, total in sums[0].items()
    }
    metrics = task_metrics(
      task,
      totals,
      num_examples=tf.cast(tf.reduce_sum(examples), tf.float32),
      num_batches=tf.cast(tf.reduce_sum(batches), tf.float32),
    )

  squared = tf.add_n([tf.reduce_sum(tf.reshape(d * d, [num_clients, -1]), axis=1) for d in deltas])
  norms = tf.sqrt(squared)
  if clip_norm is None:
    below = tf.size(norms)
  else:
    clip = tf.cast(clip_norm, tf.float32)
    # tf.clip_by_global_norm's scale, per client.
    scale = clip * tf.minimum(1.0 / norms, 1.0 / clip)
    deltas = [d * _expand_to(scale, d.shape.rank) for d in deltas]
    below = tf.reduce_sum(tf.cast(norms <= clip, tf.int32))
  if weight_cap is not None:
    client_weights = tf.minimum(client_weights / float(weight_cap), 1.0)
  update_sum = [tf.reduce_sum(d * _expand_to(client_weights, d.shape.rank), axis=0) for d in deltas]
  return CohortResult(
    update_sum=update_sum,
    weight_sum=tf.reduce_sum(client_weights),
    below_clip_count=below,
    num_clients=num_clients,
    loss_sum=tf.reduce_sum(loss_sum),
    accuracy_count=tf.reduce_sum(correct_sum),
    num_examples=tf.reduce_sum(examples),
    num_batches=tf.reduce_sum(batches),
    task_metrics=metrics,
  )


def _describe(builder: Callable[..., Any]) -> str:
  name = getattr(builder, '__qualname__', None) or type(builder).__name__
  module = getattr(builder, '__module__', None)
  return f'{module}.{name}' if module else name


def functional_model_from_builder(
  keras_model_builder: keras_model.KerasModelBuilder,
  *,
  num_features: int,
  seed: int = 0,
  label_task: str = MULTICLASS,
) -> FunctionalModel:
  """TFF's functional model of a fedpipe model, for `train_cohort`.

  The same model, initial weights and loss as `keras_model.build_model_fn`
  gives the per-client engine. Call it eagerly (TFF reads the Keras model's
  weights), outside any graph.

  Args:
    keras_model_builder: Builds a fresh, uncompiled Keras model mapping
      `num_features` floats to class logits (or probabilities from a softmax),
      or to one logit ('binary') or value ('regression').
    num_features: Input width, as in the client data.
    seed: Seeds the initializers that have none, as `build_model_fn`'s.
    label_task: The client data's label task: the loss and the labels' dtype.

  Returns:
    A `tff.learning.models.FunctionalModel`.

  Raises:
    CohortNotVectorizableError: If the model has a BatchNormalization layer
      (stateful in training) or layer regularization losses (the functional
      model would drop them): the message names the layers.
  """
  with keras_model.reproducible_keras_build(seed):
    model = keras_model_builder()
  layers = [m for m in model.submodules if isinstance(m, tf.keras.layers.Layer)]
  batch_norms = [
    layer.name for layer in layers if isinstance(layer, tf.keras.layers.BatchNormalization)
  ]
  if batch_norms:
    raise CohortNotVectorizableError(
      f'the model of {_describe(keras_model_builder)} has BatchNormalization layers '
      f"({', '.join(batch_norms)}), which update their moving statistics in training: TFF's "
      'functional model (and so the cohort engine) cannot carry that state; use '
      'LayerNormalization or GroupNormalization, or train with the per-client engine'
    )
  if model.losses:
    regularized = [layer.name for layer in layers if layer.losses] or ['(the model)']
    raise CohortNotVectorizableError(
      f'the model of {_describe(keras_model_builder)} adds regularization losses (layers '
      f"{', '.join(regularized)}), which TFF's functional model drops while the per-client "
      'engine trains on them; remove the regularizers or train with the per-client engine'
    )
  if record_schema.check_label_task(label_task) == MULTICLASS:
    loss = tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=not keras_model.outputs_probabilities(model)
    )
    return tff.learning.models.functional_model_from_keras(
      model, loss_fn=loss, input_spec=client_data.batch_spec(num_features)
    )
  # The task's Keras loss (train_cohort computes it by hand, the same math).
  loss, _ = keras_model.loss_and_metrics(label_task, model)
  return tff.learning.models.functional_model_from_keras(
    model, loss_fn=loss, input_spec=client_data.batch_spec(num_features, label_task=label_task)
  )


class CohortRunner:
  """`train_cohort` in a graph of its own, run with NumPy inputs and outputs.

  The graph is built once, with placeholders of unknown K, steps and batch
  width, so one runner trains cohorts of any size.
  """

  def __init__(
    self,
    functional_model: FunctionalModel,
    *,
    learning_rate: float,
    momentum: float | None = None,
    proximal_strength: float = 0.0,
    clip_norm: float | None = None,
    weight_cap: float | None = None,
    vectorize: bool = True,
    fallback_to_while_loop: bool = False,
    session_config: tf.compat.v1.ConfigProto | None = None,
    label_task: str = MULTICLASS,
  ):
    """Builds the graph; the arguments are `train_cohort`'s.

    `clip_norm` is the default clip norm; a call can pass another.

    Raises:
      CohortTrainingError: If a hyperparameter is out of range.
      CohortNotVectorizableError: As `train_cohort`.
    """
    trainable, non_trainable = functional_model.initial_weights
    spec = functional_model.input_spec
    features_spec = spec['x'] if isinstance(spec, dict) else spec[0]
    feature_shape = tf.TensorShape(features_spec.shape)[1:]
    self._graph = tf.Graph()
    with self._graph.as_default():
      placeholder = tf.compat.v1.placeholder
      self._trainable = [placeholder(tf.float32, np.shape(w)) for w in trainable]
      self._non_trainable = [
        placeholder(tf.as_dtype(np.asarray(w).dtype), np.shape(w)) for w in non_trainable
      ]
      self._x = placeholder(tf.float32, [None, None, None, *feature_shape])
      label_dtype = tf.float32 if label_task == REGRESSION else tf.int64
      self._y = placeholder(label_dtype, [None, None, None])
      self._mask = placeholder(tf.float32, [None, None, None])
      self._clip = None
      if clip_norm is not None:
        _check_hyperparameters(learning_rate, momentum, proximal_strength, clip_norm, weight_cap)
        self._clip = tf.compat.v1.placeholder_with_default(float(clip_norm), [])
      self._result = train_cohort(
        functional_model,
        (self._trainable, self._non_trainable),
        self._x,
        self._y,
        self._mask,
        learning_rate=learning_rate,
        momentum=momentum,
        proximal_strength=proximal_strength,
        clip_norm=self._clip,
        weight_cap=weight_cap,
        vectorize=vectorize,
        fallback_to_while_loop=fallback_to_while_loop,
        label_task=label_task,
      )
    self._graph.finalize()
    self._session = tf.compat.v1.Session(graph=self._graph, config=session_config)

  def __call__(
    self, weights: Any, cohort: StackedCohort, *, clip_norm: float | None = None
  ) -> CohortResult:
    """Trains `cohort` from `weights` (`(trainable, non_trainable)` arrays).

    Args:
      weights: The global model, as the functional model's `initial_weights`.
      cohort: The stacked clients (`stack_cohort`).
      clip_norm: This round's clip norm (adaptive clipping); default: the runner's.

    Returns:
      A `CohortResult` of NumPy values.

    Raises:
      CohortTrainingError: If `clip_norm` is given to a runner built without one.
    """
    trainable, non_trainable = weights
    feed = {self._x: cohort.x, self._y: cohort.y, self._mask: cohort.mask}
    feed.update(zip(self._trainable, trainable))
    feed.update(zip(self._non_trainable, non_trainable))
    if clip_norm is not None:
      if self._clip is None:
        raise CohortTrainingError(
          'this CohortRunner was built without clipping; build it with clip_norm=... to clip'
        )
      _check_hyperparameters(0.0, None, 0.0, clip_norm, None)
      feed[self._clip] = float(clip_norm)
    return self._session.run(self._result, feed_dict=feed)

  def close(self) -> None:
    """Releases the session."""
    self._session.close()


def metric_names(label_task: str) -> list[str]:
  """The unfinalized metrics `unfinalized_metrics` gives for a label task."""
  task = record_schema.check_label_task(label_task)
  first = {MULTICLASS: ['accuracy'], BINARY: ['auc', 'accuracy'], REGRESSION: ['mae', 'rmse']}
  return first[task] + ['loss', 'num_examples', 'num_batches']


def unfinalized_metrics(result: CohortResult, label_task: str = MULTICLASS) -> dict[str, list]:
  """A cohort's training metrics as TFF's model reports them unfinalized, summed over clients.

  Args:
    result: A `CohortResult` (tensors or NumPy values).
    label_task: The label task it was trained on.

  Returns:
    `{'accuracy': [total, count], 'loss': [total, count], 'num_examples': [n],
    'num_batches': [b]}` for 'multiclass', with `auc` added for 'binary',
    and with `mae` and `rmse` in place of `accuracy` for 'regression': the
    layout `keras_model.build_model_fn`'s model reports and
    `tff.learning.metrics.sum_then_finalize` sums (`metric_names`).
  """
  task = record_schema.check_label_task(label_task)
  count = result.num_examples
  as_float: Callable[[Any], Any] = (
    (lambda v: tf.cast(v, tf.float32)) if tf.is_tensor(count) else np.float32
  )
  metrics = dict(result.task_metrics)
  if task != REGRESSION:
    metrics['accuracy'] = [result.accuracy_count, as_float(count)]
  metrics.update(
    loss=[result.loss_sum, as_float(count)],
    num_examples=[count],
    num_batches=[result.num_batches],
  )
  return metrics
