"""User-level DP-FedAvg as one `LearningProcess` builder.

`build_dp_fedavg_process` composes `fedavg.build_fedavg_process` (weighted
FedAvg, FedProx or FedAdam, over client ids or datasets) with
`dp_aggregator.CappedWeightDPFactory` (clipped updates, capped weights,
Gaussian noise, a fixed denominator), the way TFF's
`tff.learning.algorithms.build_weighted_fed_avg` composes with a
`model_aggregator`. `dp_parameters.derive_dp_parameters` gives its DP
arguments from the clients' example counts and the sampling plan:

    params = dp_parameters.derive_dp_parameters(
        client_example_counts=counts, clients_per_round=60,
        noise_multiplier=1.0, clip_norm=0.3)
    process = dp_fedavg.build_dp_fedavg_process(
        model_fn, client_optimizer=tff.learning.optimizers.build_sgdm(0.1),
        dataset_fn=dataset_fn, **params.dp_fedavg_arguments())

References:
  McMahan, Ramage, Talwar, Zhang. Learning Differentially Private Recurrent
  Language Models. ICLR 2018. https://arxiv.org/abs/1710.06963
  Andrew, Thakkar, McMahan, Ramaswamy. Differentially Private Learning with
  Adaptive Clipping. NeurIPS 2021. https://arxiv.org/abs/1905.03871
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow_federated as tff

from fedpipe.computations import client_work, dp_aggregator, dp_parameters, fedavg


def build_dp_aggregator(
  *,
  noise_multiplier: float,
  weight_cap: float,
  expected_total_weight: float,
  clip_norm: float | None = None,
  adaptive_clipping: dp_parameters.AdaptiveClipping | None = None,
  expected_clients_per_round: float | None = None,
) -> dp_aggregator.CappedWeightDPFactory:
  """The capped-weight DP aggregator with fixed or adaptive clipping.

  Args:
    noise_multiplier: Ratio of the noise stddev to the clip norm (>= 0); under
      adaptive clipping, the total of the mechanism.
    weight_cap: Client weight at which its capped weight reaches 1 (> 0).
    expected_total_weight: Expected sum of capped weights in a round, the
      fixed denominator (> 0).
    clip_norm: Fixed clipping at this L2 norm; exactly one of it and
      `adaptive_clipping`.
    adaptive_clipping: Adaptive clipping (Andrew et al. 2021) with these settings.
    expected_clients_per_round: Expected clients a round; required with
      `adaptive_clipping`.

  Returns:
    A `dp_aggregator.CappedWeightDPFactory`.

  Raises:
    dp_aggregator.DPAggregatorConfigError: If both or neither clipping is
      given, `expected_clients_per_round` is missing under adaptive clipping,
      or a parameter is out of range.
  """
  if (clip_norm is None) == (adaptive_clipping is None):
    raise dp_aggregator.DPAggregatorConfigError(
      'set exactly one of clip_norm (fixed clipping) and adaptive_clipping, got '
      f'{clip_norm!r} and {adaptive_clipping!r}'
    )
  if adaptive_clipping is None:
    return dp_aggregator.CappedWeightDPFactory.gaussian_fixed(
      noise_multiplier=noise_multiplier,
      clip_norm=clip_norm,
      weight_cap=weight_cap,
      expected_total_weight=expected_total_weight,
    )
  if expected_clients_per_round is None:
    raise dp_aggregator.DPAggregatorConfigError(
      'adaptive clipping needs expected_clients_per_round (its clipped-count noise and '
      'quantile estimate are scaled to it)'
    )
  return dp_aggregator.CappedWeightDPFactory.gaussian_adaptive(
    noise_multiplier=noise_multiplier,
    expected_clients_per_round=expected_clients_per_round,
    weight_cap=weight_cap,
    expected_total_weight=expected_total_weight,
    initial_clip_norm=adaptive_clipping.initial_clip_norm,
    target_unclipped_quantile=adaptive_clipping.target_unclipped_quantile,
    learning_rate=adaptive_clipping.learning_rate,
    clipped_count_stddev=adaptive_clipping.clipped_count_stddev,
  )


def build_dp_fedavg_process(
  model_fn: Callable[[], tff.learning.models.VariableModel],
  *,
  noise_multiplier: float,
  weight_cap: float,
  expected_total_weight: float,
  clip_norm: float | None = None,
  adaptive_clipping: dp_parameters.AdaptiveClipping | None = None,
  expected_clients_per_round: float | None = None,
  client_optimizer: tff.learning.optimizers.Optimizer,
  server_optimizer: tff.learning.optimizers.Optimizer | None = None,
  proximal_strength: float = 0.0,
  dataset_fn: client_work.DatasetFn | None = None,
) -> tff.learning.templates.LearningProcess:
  """Builds user-level DP-FedAvg (McMahan et al. 2018) as a `LearningProcess`.

  Each round, every participating client trains locally; its model update is
  clipped to the clip norm (fixed, or adaptive: Andrew et al. 2021) and
  weighted by `min(examples / weight_cap, 1)`; the server sums, adds
  Gaussian noise of stddev `noise_multiplier * clip_norm`, divides by
  `expected_total_weight` and applies the result with `server_optimizer`.
  One client's presence moves the noise-free sum by at most the clip norm, so
  the noise multiplier and the client sampling give user-level (ε, δ)
  (`privacy_accounting.compute_epsilon`). The process is
  `fedavg.build_fedavg_process` with `dp_aggregator.CappedWeightDPFactory` as
  its model aggregator: same type signature, state and metrics, plus the
  aggregator's state (the clip norm under adaptive clipping).

  Type signature, with `dataset_fn`:
  `next: (<S@SERVER, {str}@CLIENTS> -> <state=S@SERVER, metrics=M@SERVER>)`,
  clients given by id and their data read where the computation runs;
  without it, clients take datasets `{B*}@CLIENTS` directly.

  Args:
    model_fn: No-argument constructor of the TFF model.
    noise_multiplier: Ratio of the noise stddev to the clip norm (>= 0; 0 adds
      no noise); under adaptive clipping, the total of the mechanism.
    weight_cap: Client weight (examples in its round) at which its capped
      weight reaches 1 (> 0).
    expected_total_weight: Expected sum of capped weights in a round, the
      fixed denominator (> 0).
    clip_norm: Fixed clipping at this L2 norm; exactly one of it and
      `adaptive_clipping`.
    adaptive_clipping: Adaptive clipping with these settings.
    expected_clients_per_round: Expected clients a round; required with
      `adaptive_clipping`.
    client_optimizer: Local optimizer (e.g. `build_sgdm(learning_rate=0.1)`).
    server_optimizer: Applies the noised mean update; default SGD at
      learning rate 1 (plain FedAvg); Adam gives DP-FedAdam.
    proximal_strength: FedProx's μ; 0 is FedAvg.
    dataset_fn: Optional function from a client-id tensor to its dataset
      (see `client_data.make_dataset_fn`), run inside each client's training
      computation.

  Returns:
    A `tff.learning.templates.LearningProcess`.

  Raises:
    dp_aggregator.DPAggregatorConfigError: If a DP parameter is out of range
      or the clipping is given twice or not at all.
    fedavg.FedAvgConfigError: If `proximal_strength` is negative.
  """
  aggregator = build_dp_aggregator(
    noise_multiplier=noise_multiplier,
    weight_cap=weight_cap,
    expected_total_weight=expected_total_weight,
    clip_norm=clip_norm,
    adaptive_clipping=adaptive_clipping,
    expected_clients_per_round=expected_clients_per_round,
  )
  return fedavg.build_fedavg_process(
    model_fn,
    client_optimizer=client_optimizer,
    server_optimizer=(
      server_optimizer
      if server_optimizer is not None
      else tff.learning.optimizers.build_sgdm(learning_rate=1.0)
    ),
    model_aggregator=aggregator,
    proximal_strength=proximal_strength,
    dataset_fn=dataset_fn,
  )
