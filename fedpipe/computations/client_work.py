"""Client work that opens the client's data and trains on it in one TensorFlow call.

TFF's `compose_dataset_computation_with_learning_process` runs two TF
computations per client (build the dataset, then train on it), and the C++
executor pays a per-call cost for each, which adds up over a round's clients
(benchmarks/RESULTS.md compares fedpipe's round with plain TFF's on in-memory
datasets). This client work takes client ids and does both inside one
computation, reusing TFF's own local training loop (`model_delta_client_work`; FedProx
through `proximal_optimizer`).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedpipe.computations import proximal_optimizer

DatasetFn = Callable[[tf.Tensor], tf.data.Dataset]


@dataclasses.dataclass(frozen=True)
class ClientWorkOverIds:
  """The four computations of a client-work process whose client data are ids."""

  initialize: tff.Computation
  next: tff.Computation
  get_hparams: tff.Computation
  set_hparams: tff.Computation


def build_client_work_over_ids(
  model_fn: Callable[[], tff.learning.models.VariableModel],
  *,
  dataset_fn: DatasetFn,
  optimizer: tff.learning.optimizers.Optimizer,
  proximal_strength: float = 0.0,
  client_weighting: tff.learning.ClientWeighting = tff.learning.ClientWeighting.NUM_EXAMPLES,
) -> ClientWorkOverIds:
  """Local training from client ids, shaped like a `ClientWorkProcess`.

  Type signature: `next: (<S@SERVER, {W}@CLIENTS, {str}@CLIENTS> ->
  <S@SERVER, {ClientResult}@CLIENTS, M@SERVER>)`, like TFF's model-delta client
  work with client ids in place of datasets.

  Args:
    model_fn: No-argument constructor of the TFF model.
    dataset_fn: Builds a client's training dataset from its id (a string
      tensor), inside the computation, where the data is.
    optimizer: The client optimizer.
    proximal_strength: FedProx's μ; 0 trains plain FedAvg updates.
    client_weighting: How client updates are weighted.

  Returns:
    A `ClientWorkOverIds` (TFF's `ClientWorkProcess` insists on datasets).
  """
  if proximal_strength > 0:
    # TFF's own proximal client work pushes away from the global model
    # (`proximal_optimizer`'s docstring): FedProx is the optimizer here.
    optimizer = proximal_optimizer.ProximalOptimizer(optimizer, proximal_strength)

  with tf.Graph().as_default():
    model = model_fn()
    metrics_aggregation_fn = tff.learning.metrics.sum_then_finalize(model.metric_finalizers())
  weights_type = tff.learning.models.weights_type_from_model(model)
  whimsy_state = optimizer.initialize(tf.TensorSpec(shape=(), dtype=tf.float32))
  initial_hparams = optimizer.get_hparams(whimsy_state)

  @tff.federated_computation
  def init_fn():
    return tff.federated_value(initial_hparams, tff.SERVER)

  state_type = init_fn.type_signature.result.member

  @tff.tensorflow.computation(state_type)
  def get_hparams_fn(state):
    return state

  @tff.tensorflow.computation(state_type, state_type)
  def set_hparams_fn(state, hparams):
    del state
    return hparams

  @tff.tensorflow.computation(state_type, weights_type, np.str_)
  def client_update(optimizer_hparams, initial_weights, client_id):
    update = (
      tff.learning.templates.model_delta_client_work.build_model_delta_update_with_tff_optimizer(
        model_fn=model_fn,
        weighting=client_weighting,
        loop_implementation=tff.learning.LoopImplementation.DATASET_REDUCE,
      )
    )
    return update(optimizer, initial_weights, dataset_fn(client_id), optimizer_hparams)

  @tff.federated_computation(
    init_fn.type_signature.result,
    tff.FederatedType(weights_type, tff.CLIENTS),
    tff.FederatedType(np.str_, tff.CLIENTS),
  )
  def next_fn(state, weights, client_ids):
    state_at_clients = tff.federated_broadcast(state)
    client_result, model_outputs = tff.federated_map(
      client_update, (state_at_clients, weights, client_ids)
    )
    measurements = tff.federated_zip(
      collections.OrderedDict(train=metrics_aggregation_fn(model_outputs))
    )
    return tff.templates.MeasuredProcessOutput(state, client_result, measurements)

  return ClientWorkOverIds(init_fn, next_fn, get_hparams_fn, set_hparams_fn)


def compose_fedavg_over_ids(
  model_fn: Callable[[], tff.learning.models.VariableModel],
  *,
  client_work: ClientWorkOverIds,
  server_optimizer: tff.learning.optimizers.Optimizer,
  model_aggregator: tff.aggregators.WeightedAggregationFactory | None = None,
) -> tff.learning.templates.LearningProcess:
  """Weighted FedAvg around `client_work`: TFF's broadcast, aggregator and finalizer.

  The same state layout (`LearningAlgorithmState`) and metrics as TFF's
  `build_weighted_fed_avg`, so checkpoints and metric names do not change;
  only the clients' data are ids instead of datasets.
  """

  @tff.tensorflow.computation()
  def initial_model_weights_fn():
    return tff.learning.models.ModelWeights.from_model(model_fn())

  weights_type = initial_model_weights_fn.type_signature.result
  distributor = tff.learning.templates.build_broadcast_process(weights_type)
  aggregator = (model_aggregator or tff.aggregators.MeanFactory()).create(
    weights_type.trainable, tff.TensorType(np.float32)
  )
  finalizer = tff.learning.templates.build_apply_optimizer_finalizer(server_optimizer, weights_type)
  State = tff.learning.templates.LearningAlgorithmState

  @tff.federated_computation()
  def init_fn():
    return tff.federated_zip(
      State(
        tff.federated_eval(initial_model_weights_fn, tff.SERVER),
        distributor.initialize(),
        client_work.initialize(),
        aggregator.initialize(),
        finalizer.initialize(),
      )
    )

  @tff.federated_computation(init_fn.type_signature.result, tff.FederatedType(np.str_, tff.CLIENTS))
  def next_fn(state, client_ids):
    distributed = distributor.next(state.distributor, state.global_model_weights)
    trained = client_work.next(state.client_work, distributed.result, client_ids)
    aggregated = aggregator.next(
      state.aggregator, trained.result.update, trained.result.update_weight
    )
    finalized = finalizer.next(state.finalizer, state.global_model_weights, aggregated.result)
    new_state = tff.federated_zip(
      State(finalized.result, distributed.state, trained.state, aggregated.state, finalized.state)
    )
    metrics = tff.federated_zip(
      collections.OrderedDict(
        distributor=distributed.measurements,
        client_work=trained.measurements,
        aggregator=aggregated.measurements,
        finalizer=finalized.measurements,
      )
    )
    return tff.learning.templates.LearningProcessOutput(new_state, metrics)

  state_type = init_fn.type_signature.result.member

  @tff.tensorflow.computation(state_type)
  def get_model_weights_fn(state):
    return state.global_model_weights

  @tff.tensorflow.computation(state_type, state_type.global_model_weights)
  def set_model_weights_fn(state, weights):
    return State(weights, state.distributor, state.client_work, state.aggregator, state.finalizer)

  @tff.tensorflow.computation(state_type)
  def get_hparams_fn(state):
    return collections.OrderedDict(
      client_work=client_work.get_hparams(state.client_work),
      finalizer=finalizer.get_hparams(state.finalizer),
    )

  @tff.tensorflow.computation(state_type, get_hparams_fn.type_signature.result)
  def set_hparams_fn(state, hparams):
    return State(
      state.global_model_weights,
      state.distributor,
      client_work.set_hparams(state.client_work, hparams['client_work']),
      state.aggregator,
      finalizer.set_hparams(state.finalizer, hparams['finalizer']),
    )

  return tff.learning.templates.LearningProcess(
    init_fn,
    next_fn,
    get_model_weights_fn,
    set_model_weights_fn,
    get_hparams_fn=get_hparams_fn,
    set_hparams_fn=set_hparams_fn,
  )
