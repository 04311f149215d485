"""Weighted federated averaging, optionally with FedProx, FedAdam and DP aggregation.

One builder covers the variants a study picks from: the client objective
(plain or proximal), the server optimizer (SGD with momentum, or Adam:
FedAdam) and the model-update aggregator (TFF's weighted mean, or
`dp_aggregator.CappedWeightDPFactory` for user-level DP-FedAvg).

References:
  McMahan et al. Communication-Efficient Learning of Deep Networks from
  Decentralized Data. AISTATS 2017. https://arxiv.org/abs/1602.05629
  Li et al. Federated Optimization in Heterogeneous Networks (FedProx).
  MLSys 2020. https://arxiv.org/abs/1812.06127
  Reddi et al. Adaptive Federated Optimization (FedAdam). ICLR 2021.
  https://arxiv.org/abs/2003.00295
"""

from __future__ import annotations

import math
from collections.abc import Callable

import tensorflow as tf
import tensorflow_federated as tff

from fedpipe.computations import client_work, proximal_optimizer
from fedpipe.errors import FedpipeError


class FedAvgConfigError(FedpipeError, ValueError):
  """A FedAvg parameter is out of its valid range."""


def cosine_decay(
  learning_rate: float, *, rounds: int, final_fraction: float = 0.1
) -> Callable[[tf.Tensor], tf.Tensor]:
  """A round -> learning rate schedule for `tff.learning.optimizers.schedule_learning_rate`.

  Decays from `learning_rate` at round 0 to `final_fraction * learning_rate`
  at round `rounds` along a half cosine, then stays there.
  """

  def schedule(round_num: tf.Tensor) -> tf.Tensor:
    progress = tf.minimum(tf.cast(round_num, tf.float32) / float(max(rounds, 1)), 1.0)
    cosine = 0.5 * (1.0 + tf.cos(math.pi * progress))
    return learning_rate * (final_fraction + (1.0 - final_fraction) * cosine)

  return schedule


def build_fedavg_process(
  model_fn: Callable[[], tff.learning.models.VariableModel],
  *,
  client_optimizer: tff.learning.optimizers.Optimizer,
  server_optimizer: tff.learning.optimizers.Optimizer,
  model_aggregator: tff.aggregators.WeightedAggregationFactory | None = None,
  proximal_strength: float = 0.0,
  dataset_fn: client_work.DatasetFn | None = None,
) -> tff.learning.templates.LearningProcess:
  """Builds example-weighted FedAvg (or FedProx) as a `LearningProcess`.

  Type signature, with `dataset_fn`:
  `next: (<S@SERVER, {str}@CLIENTS> -> <state=S@SERVER, metrics=M@SERVER>)`,
  clients given by id and their data read where the computation runs;
  without it, clients take datasets `{B*}@CLIENTS` directly.

  Args:
    model_fn: No-argument constructor of the TFF model.
    client_optimizer: Local optimizer (e.g. `build_sgdm(learning_rate=0.1)`).
    server_optimizer: Applies the aggregated update (SGD with momentum; Adam
      gives FedAdam).
    model_aggregator: Aggregator of weighted client updates. `None`: TFF's
      weighted mean (no DP).
    proximal_strength: FedProx's μ; 0 is FedAvg.
    dataset_fn: Optional function from a client-id tensor to its dataset
      (see `client_data.make_dataset_fn`), run inside each client's training
      computation.

  Returns:
    A `tff.learning.templates.LearningProcess`.

  Raises:
    FedAvgConfigError: If `proximal_strength` is negative.
  """
  if proximal_strength < 0:
    raise FedAvgConfigError(f'proximal_strength must be >= 0, got {proximal_strength}')
  if dataset_fn is not None:
    return client_work.compose_fedavg_over_ids(
      model_fn,
      client_work=client_work.build_client_work_over_ids(
        model_fn,
        dataset_fn=dataset_fn,
        optimizer=client_optimizer,
        proximal_strength=proximal_strength,
      ),
      server_optimizer=server_optimizer,
      model_aggregator=model_aggregator,
    )
  if proximal_strength > 0:
    # Not TFF's build_weighted_fed_prox: its proximal term has the wrong sign
    # (`proximal_optimizer`).
    client_optimizer = proximal_optimizer.ProximalOptimizer(client_optimizer, proximal_strength)
  return tff.learning.algorithms.build_weighted_fed_avg(
    model_fn,
    client_optimizer_fn=client_optimizer,
    server_optimizer_fn=server_optimizer,
    model_aggregator=model_aggregator,
  )
