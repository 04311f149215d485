"""Federated evaluation of a global model on clients' held-out data."""

from __future__ import annotations

from collections.abc import Callable

import tensorflow_federated as tff


def build_federated_evaluation(
  model_fn: Callable[[], tff.learning.models.VariableModel],
  *,
  dataset_computation: tff.Computation | None = None,
) -> tff.learning.templates.LearningProcess:
  """Builds federated evaluation as a `LearningProcess`.

  Set the model with `set_model_weights(state, weights)`; `next(state, clients)`
  returns metrics summed over clients (`metrics_of` extracts them).

  Args:
    model_fn: No-argument constructor of the TFF model.
    dataset_computation: Optional TFF computation from a client id to its
      evaluation dataset, run where the data is.

  Returns:
    A `tff.learning.templates.LearningProcess`.
  """
  process = tff.learning.algorithms.build_fed_eval(model_fn)
  if dataset_computation is not None:
    process = tff.simulation.compose_dataset_computation_with_learning_process(
      dataset_computation, process
    )
  return process


def metrics_of(output: tff.learning.templates.LearningProcessOutput) -> dict[str, float]:
  """The evaluation metrics of one `next` call, as plain floats."""
  metrics = output.metrics['client_work']['eval']['current_round_metrics']
  return {name: float(value) for name, value in metrics.items()}
