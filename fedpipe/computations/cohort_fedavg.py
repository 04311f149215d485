"""(DP-)FedAvg whose TFF clients are cohorts of users, each cohort trained in one vectorized call.

The per-client engine (`dp_fedavg.build_dp_fedavg_process`) makes every user
a TFF client, and TFF's executor charges a fixed cost per client. Here each
member of the CLIENTS placement is a *cohort*: a comma-separated list of user
ids (`cohort_string`). One TensorFlow computation per cohort reads its users'
data where it lives (`cohort_data`), trains all of their local models at
once (`cohort_training.train_cohort`) and returns the cohort's part of the DP
query's sample state: the sum of its users' capped-weight, clipped updates
(and, under adaptive clipping, their below-clip count). The server side is
the per-client engine's: the same DP query (`dp_aggregator.CappedWeightDPFactory`)
adds the noise once to the sum over cohorts, divides by the fixed
denominator and adapts the clip norm; the same server optimizer applies the
result. The unit of privacy stays one user: each user's summand is clipped
and weighted exactly as before, and sampling samples users.

The state has the per-client engine's layout (`LearningAlgorithmState`), so
`get_model_weights` feeds the same evaluation.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedpipe.computations import cohort_data, cohort_training, dp_aggregator, keras_model
from fedpipe.data import client_ids as client_ids_lib
from fedpipe.data import record_schema
from fedpipe.errors import FedpipeError

# Between a cohort's user ids; a silo's governance gate splits on the same.
SEPARATOR = client_ids_lib.COHORT_SEPARATOR


class CohortProcessError(FedpipeError, ValueError):
  """The cohort engine cannot be built or fed as asked; the message says why."""


def cohort_string(client_ids: Sequence[str]) -> str:
  """The CLIENTS value of one cohort: its user ids, comma-separated.

  Raises:
    CohortProcessError: If the cohort is empty or an id contains the separator.
  """
  if not client_ids:
    raise CohortProcessError('a cohort needs at least one client id')
  bad = [c for c in client_ids if SEPARATOR in c or not c]
  if bad:
    raise CohortProcessError(f'client ids cannot be empty or contain {SEPARATOR!r}: {bad[:5]}')
  return SEPARATOR.join(client_ids)


def group_into_cohorts(
  client_ids: Sequence[str],
  examples: dict[str, int],
  *,
  max_cohort_size: int,
  min_cohorts: int = 1,
) -> list[str]:
  """A round's sampled users as cohorts of at most `max_cohort_size`, similar sizes together.

  Users are sorted by their number of examples, so that a cohort's users take
  similar numbers of local steps and little of the stacked batch is padding.

  Args:
    client_ids: The users sampled for the round.
    examples: User id -> its number of training examples.
    max_cohort_size: Most users in one cohort (>= 1): bounds a cohort's memory
      (one copy of the weights and optimizer state per user).
    min_cohorts: Fewest cohorts (while there are as many users): the worker
      trains its cohorts in parallel, so one per core keeps every core busy.

  Returns:
    Cohort strings (`cohort_string`), as even in size as the bounds allow.

  Raises:
    CohortProcessError: If `max_cohort_size` or `min_cohorts` is < 1.
  """
  for name, value in (('max_cohort_size', max_cohort_size), ('min_cohorts', min_cohorts)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise CohortProcessError(f'{name} must be an integer >= 1, got {value!r}')
  ordered = sorted(client_ids, key=lambda c: (examples.get(c, 0), c))
  if not ordered:
    return []
  count = max(-(-len(ordered) // max_cohort_size), min(min_cohorts, len(ordered)))
  bounds = np.linspace(0, len(ordered), count + 1).round().astype(int)
  return [cohort_string(ordered[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def group_into_silo_cohorts(
  client_ids: Sequence[str],
  examples: dict[str, int],
  *,
  max_cohort_size: int,
  min_cohorts: int = 1,
) -> list[str]:
  """A round's sampled users across silos as cohorts, none spanning two silos.

  Each silo's users are grouped as `group_into_cohorts` groups them, and
  each cohort is sent as '<silo>/<id>,<id>,...': the silo's name once, then
  its users' own ids. The coordinator's routing (`cross_silo`) sends the
  whole cohort to that silo, whose worker gets '<id>,<id>,...' and whose
  governance gate counts (and checks) each user in it.

  Args:
    client_ids: The users sampled for the round, as '<silo>/<client id>'.
    examples: Such an id -> its number of examples.
    max_cohort_size: Most users in one cohort (>= 1), as for `group_into_cohorts`.
    min_cohorts: Fewest cohorts of each silo (while it has as many sampled
      users): its worker trains them in parallel.

  Returns:
    The cohorts, one silo's after another's in the order of the silos' names.

  Raises:
    CohortProcessError: If an id is not '<silo>/<client id>', or
      `max_cohort_size` or `min_cohorts` is < 1.
  """
  # Checks the bounds, whether or not any user was sampled.
  group_into_cohorts((), {}, max_cohort_size=max_cohort_size, min_cohorts=min_cohorts)
  silo_separator = client_ids_lib.SILO_SEPARATOR
  by_silo: dict[str, list[str]] = {}
  for global_id in client_ids:
    silo, separator, local = global_id.partition(silo_separator)
    if not (silo and separator and local) or silo_separator in local:
      raise CohortProcessError(
        f'client id {global_id!r} is not <silo>{silo_separator}<client id>; across silos '
        "every id carries its silo's name (cross_silo.union_manifest)"
      )
    by_silo.setdefault(silo, []).append(local)
  cohorts = []
  for silo, local_ids in sorted(by_silo.items()):
    local_examples = {c: examples.get(f'{silo}{silo_separator}{c}', 0) for c in local_ids}
    cohorts += [
      f'{silo}{silo_separator}{cohort}'
      for cohort in group_into_cohorts(
        local_ids, local_examples, max_cohort_size=max_cohort_size, min_cohorts=min_cohorts
      )
    ]
  return cohorts


def check_metric_names(metric_names: Sequence[str], label_task: str) -> None:
  """Checks that the cohort engine computes each metric the per-client engine's model reports.

  Raises:
    CohortProcessError: Naming the metrics it does not compute for `label_task`.
  """
  available = cohort_training.metric_names(label_task)
  missing = [name for name in metric_names if name not in available]
  if missing:
    raise CohortProcessError(
      f'the model reports the metrics {missing}, which the cohort engine does not compute for '
      f'label task {label_task!r} (it computes {available}); build model_fn with '
      'keras_model.build_model_fn(..., label_task=...) for the same label task'
    )


def build_cohort_dp_fedavg_process(
  model_fn: Callable[[], tff.learning.models.VariableModel],
  keras_model_builder: keras_model.KerasModelBuilder,
  *,
  num_features: int,
  aggregator: dp_aggregator.CappedWeightDPFactory | None,
  cohort_fn: Callable[[tf.Tensor], cohort_data.CohortBatches],
  client_learning_rate: float,
  server_optimizer: tff.learning.optimizers.Optimizer,
  proximal_strength: float = 0.0,
  seed: int = 0,
  label_task: str = record_schema.MULTICLASS,
) -> tff.learning.templates.LearningProcess:
  """Builds DP-FedAvg over cohorts of users (see the module docstring).

  Type signature: `next: (<S@SERVER, {str}@CLIENTS> -> <state=S@SERVER,
  metrics=M@SERVER>)`, each CLIENTS value a cohort (`group_into_cohorts`).

  Args:
    model_fn: The per-client engine's model constructor: the initial weights,
      the weights' types and the metrics' finalizers come from it.
    keras_model_builder: The Keras model `model_fn` wraps; its functional form
      trains the cohorts.
    num_features: Input width.
    aggregator: The DP aggregation (fixed or adaptive clipping, noise, capped
      weights, fixed denominator), as the per-client engine is given it; None
      for FedAvg without DP: the mean of the users' updates weighted by their
      examples processed, as `fedavg.build_fedavg_process` aggregates.
    cohort_fn: Reads and stacks a cohort's users' data from a tensor of ids
      (`cohort_data.make_cohort_fn`), run where the data is.
    client_learning_rate: Users' local SGD learning rate.
    server_optimizer: Applies the noised mean update.
    proximal_strength: FedProx's mu; 0 is FedAvg.
    seed: Seeds the functional model's build as `model_fn`'s.
    label_task: The client data's label task, as `model_fn` was built for:
      the loss and metrics.

  Returns:
    A `tff.learning.templates.LearningProcess`.

  Raises:
    cohort_training.CohortNotVectorizableError: If the model cannot be
      trained as a cohort (the message names the layer and the fallback).
    CohortProcessError: If `model_fn`'s model reports metrics the cohort
      engine does not compute for `label_task`.
  """
  functional = cohort_training.functional_model_from_builder(
    keras_model_builder, num_features=num_features, seed=seed, label_task=label_task
  )
  with tf.Graph().as_default():
    model = model_fn()
    metrics_aggregation_fn = tff.learning.metrics.sum_then_finalize(model.metric_finalizers())
    metric_names = list(model.report_local_unfinalized_metrics().keys())
  check_metric_names(metric_names, label_task)
  dp = aggregator is not None
  query = aggregator.query if dp else None
  adaptive = dp and aggregator.adaptive
  weight_cap = aggregator.weight_cap if dp else None
  learning_rate = float(client_learning_rate)
  mu = float(proximal_strength)

  @tff.tensorflow.computation()
  def initial_model_weights_fn():
    return tff.learning.models.ModelWeights.from_model(model_fn())

  weights_type = initial_model_weights_fn.type_signature.result

  @tff.tensorflow.computation()
  def initial_query_state_fn():
    # Without DP the aggregator keeps no state: an empty structure.
    return query.initial_global_state() if dp else collections.OrderedDict()

  query_state_type = initial_query_state_fn.type_signature.result

  @tff.tensorflow.computation(query_state_type)
  def sample_params_fn(state):
    return query.derive_sample_params(state) if dp else np.float32(0.0)

  params_type = sample_params_fn.type_signature.result

  @tff.tensorflow.computation(weights_type, params_type, np.str_)
  def train_cohort_fn(weights, params, cohort):
    ids = tf.strings.split(cohort, SEPARATOR)
    batches = cohort_fn(ids)
    clip = (params.sum_params if adaptive else params) if dp else None
    result = cohort_training.train_cohort(
      functional,
      (tuple(weights.trainable), tuple(weights.non_trainable)),
      batches.x,
      batches.y,
      batches.mask,
      learning_rate=learning_rate,
      proximal_strength=mu,
      clip_norm=clip,
      weight_cap=weight_cap,
      label_task=label_task,
    )
    update_sum = list(result.update_sum)
    if not dp:
      # Σ n_k Δ_k and Σ n_k: the server divides.
      sample = collections.OrderedDict(update_sum=update_sum, weight_sum=result.weight_sum)
    elif adaptive:
      # The quantile estimator's record is (unclipped norm <= clip) - 0.5 per user.
      below = tf.cast(result.below_clip_count, tf.float32) - 0.5 * tf.cast(
        result.num_clients, tf.float32
      )
      sample = collections.OrderedDict(sum_state=update_sum, quantile_estimator_state=below)
    else:
      sample = update_sum
    metrics = cohort_training.unfinalized_metrics(result, label_task)
    return sample, collections.OrderedDict((k, metrics[k]) for k in metric_names)

  sample_type = train_cohort_fn.type_signature.result[0]

  @tff.tensorflow.computation(sample_type, query_state_type)
  def noised_mean_fn(sample, state):
    if not dp:
      total = sample['weight_sum']
      # No example processed (or every update non-finite): no change, as TFF's mean.
      scale = tf.math.divide_no_nan(1.0, total)
      mean = [u * scale for u in sample['update_sum']]
      return mean, state, collections.OrderedDict()
    if adaptive:
      template = {'update': [tf.TensorSpec(t.shape, t.dtype) for t in weights_type.trainable]}
      sample = query.initial_sample_state(template)._replace(
        sum_state=list(sample['sum_state']),
        quantile_estimator_state=sample['quantile_estimator_state'],
      )
    else:
      sample = list(sample)
    result, new_state, _ = query.get_noised_result(sample, state)
    metrics = collections.OrderedDict(dp_query_metrics=query.derive_metrics(new_state))
    return result, new_state, metrics

  distributor = tff.learning.templates.build_broadcast_process(weights_type)
  finalizer = tff.learning.templates.build_apply_optimizer_finalizer(server_optimizer, weights_type)
  State = tff.learning.templates.LearningAlgorithmState

  @tff.federated_computation()
  def init_fn():
    return tff.federated_zip(
      State(
        tff.federated_eval(initial_model_weights_fn, tff.SERVER),
        distributor.initialize(),
        tff.federated_value(np.float32(learning_rate), tff.SERVER),
        tff.federated_eval(initial_query_state_fn, tff.SERVER),
        finalizer.initialize(),
      )
    )

  @tff.federated_computation(init_fn.type_signature.result, tff.FederatedType(np.str_, tff.CLIENTS))
  def next_fn(state, cohorts):
    distributed = distributor.next(state.distributor, state.global_model_weights)
    params = tff.federated_broadcast(tff.federated_map(sample_params_fn, state.aggregator))
    samples, metrics = tff.federated_map(train_cohort_fn, (distributed.result, params, cohorts))
    result, query_state, dp_metrics = tff.federated_map(
      noised_mean_fn, (tff.federated_sum(samples), state.aggregator)
    )
    finalized = finalizer.next(state.finalizer, state.global_model_weights, result)
    new_state = tff.federated_zip(
      State(finalized.result, distributed.state, state.client_work, query_state, finalized.state)
    )
    measurements = tff.federated_zip(
      collections.OrderedDict(
        distributor=distributed.measurements,
        client_work=tff.federated_zip(
          collections.OrderedDict(train=metrics_aggregation_fn(metrics))
        ),
        aggregator=dp_metrics,
        finalizer=finalized.measurements,
      )
    )
    return tff.learning.templates.LearningProcessOutput(new_state, measurements)

  state_type = init_fn.type_signature.result.member

  @tff.tensorflow.computation(state_type)
  def get_model_weights_fn(state):
    return state.global_model_weights

  @tff.tensorflow.computation(state_type, state_type.global_model_weights)
  def set_model_weights_fn(state, weights):
    return State(weights, state.distributor, state.client_work, state.aggregator, state.finalizer)

  return tff.learning.templates.LearningProcess(
    init_fn, next_fn, get_model_weights_fn, set_model_weights_fn
  )
