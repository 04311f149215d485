"""Program logic of a training run: rounds, checkpoints, metrics, privacy so far.

Takes only interfaces (processes, a state manager, release managers), in
the manner of TFF's example program logic, so the same loop runs on the local
runtime and across silos. Resuming is built in: the latest saved state is
loaded and the run continues from the round after it; client sampling is a
pure function of (seed, round), so a resumed run draws the clients an
uninterrupted one would have. It prints nothing: each round goes to the
caller's `on_round` callback as a `RoundProgress` (`format_progress` makes
the familiar one-line form), and resuming is logged (`fedpipe` logger).
tests/training/test_loop.py runs it with fake processes and managers.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tensorflow_federated as tff

from fedpipe.computations import client_sampling, evaluation
from fedpipe.errors import FedpipeError
from fedpipe.federation import cross_silo
from fedpipe.runtime import rpc_errors
from fedpipe.training import experiment as experiment_lib

_log = logging.getLogger(__name__)


class RoundFailedError(FedpipeError, RuntimeError):
  """A training round failed; the message names the round and the cause."""


@dataclasses.dataclass(frozen=True)
class RoundProgress:
  """One completed round, as `train` reports it to its `on_round` callback.

  Attributes:
    round: The round just completed (1-based).
    rounds: The rounds of the whole run.
    metrics: The round's released metrics, as in `metrics.csv`: clients,
      train_loss, train_<metric> per model metric (train_accuracy; for the
      label task 'binary' also train_auc, for 'regression' train_mae and
      train_rmse instead), train_examples, round_seconds, and when they
      apply epsilon, clip_norm, eval_loss, eval_<metric>, dropped_silos.
    epsilon: ε spent after this round (None without DP).
    last_checkpoint: The last round whose state is saved (a rerun resumes
      after it); equal to `round` when this round was saved.
  """

  round: int
  rounds: int
  metrics: dict[str, float]
  epsilon: float | None
  last_checkpoint: int


@dataclasses.dataclass
class Progress:
  """How far a run has got, updated by `train` as it goes.

  A caller keeps a reference to say where an interrupted run stopped.

  Attributes:
    rounds_completed: The last round whose metrics were released (0: none).
    last_checkpoint: The last round whose state was saved (0: none); a rerun
      resumes from it.
  """

  rounds_completed: int = 0
  last_checkpoint: int = 0


@dataclasses.dataclass(frozen=True)
class TrainingResult:
  """Where a run ended."""

  state: Any
  rounds_completed: int
  resumed_from: int
  epsilon: float | None


def describe_error(error: BaseException) -> str:
  """One line for an execution error: a worker's gRPC status, not its graph dump."""
  for e in rpc_errors.error_chain(error):
    if isinstance(e, cross_silo.SiloError):
      return str(e)
  rpc = rpc_errors.find_rpc_error(error)
  if rpc is not None:
    return f'worker error {rpc_errors.rpc_summary(rpc, limit=None)}'
  return rpc_errors.exception_summary(error, limit=500)


def epsilon_after(experiment: experiment_lib.Experiment, rounds: int) -> float | None:
  """ε spent after `rounds` rounds, or None without DP (`experiment_lib.epsilon_after`)."""
  return experiment_lib.epsilon_after(experiment, rounds)


def evaluate(experiment: experiment_lib.Experiment, model_weights: Any) -> dict[str, float]:
  """Federated evaluation of `model_weights` on every evaluation client."""
  process = experiment.eval_process
  state = process.set_model_weights(process.initialize(), model_weights)
  return evaluation.metrics_of(
    process.next(state, experiment.eval_input(experiment.eval_client_ids))
  )


# Counts TFF reports next to the model's metrics; not released per metric.
_COUNTS = ('num_examples', 'num_batches')


def model_metric_names(metrics: Mapping[str, Any]) -> list[str]:
  """The model's metrics among a metrics dict, loss first: 'loss', 'accuracy' (or 'auc', 'mae', ...)."""
  names = [n for n in metrics if n not in _COUNTS and n != 'loss']
  return (['loss'] if 'loss' in metrics else []) + names


def _round_metrics(output: Any) -> dict[str, float]:
  train = output.metrics['client_work']['train']
  metrics = {f'train_{name}': float(train[name]) for name in model_metric_names(train)}
  metrics['train_examples'] = float(train['num_examples'])
  dp_metrics = output.metrics.get('aggregator', {}).get('dp_query_metrics', {})
  if 'clip' in dp_metrics:
    metrics['clip_norm'] = float(dp_metrics['clip'])
  return metrics


def format_progress(progress: RoundProgress) -> str:
  """One line for a round: `round  3/100  clients=61  loss=...  accuracy=...  epsilon=...  1.23s`."""
  return _format_progress(progress.round, progress.rounds, progress.metrics)


def _format_progress(round_num: int, rounds: int, values: dict[str, float]) -> str:
  parts = [
    f'round {round_num:>{len(str(rounds))}}/{rounds}',
    f'clients={int(values["clients"]):d}',
  ]
  # The model's metrics: loss, then accuracy (or auc and accuracy, or mae and rmse).
  parts += [
    f'{key[len("train_") :]}={value:.4f}'
    for key, value in values.items()
    if key.startswith('train_') and key != 'train_examples'
  ]
  if 'epsilon' in values:
    parts.append(f'epsilon={values["epsilon"]:.3f}')
  if values.get('dropped_silos'):
    parts.append(f'dropped_silos={int(values["dropped_silos"])}')
  parts += [
    f'{key}={value:.4f}'
    for key, value in values.items()
    if key.startswith('eval_') and key != 'eval_loss'
  ]
  parts.append(f'{values["round_seconds"]:.2f}s')
  return '  '.join(parts)


async def train(
  experiment: experiment_lib.Experiment,
  *,
  sampling_seed: int,
  state_manager: tff.program.ProgramStateManager,
  release_managers: Sequence[tff.program.ReleaseManager],
  checkpoint_every: int = 1,
  eval_every: int = 0,
  on_round: Callable[[RoundProgress], None] | None = None,
  runtime_metrics: Callable[[], dict[str, float]] | None = None,
  progress: Progress | None = None,
) -> TrainingResult:
  """Runs (or resumes) training to `experiment.rounds` rounds.

  Args:
    experiment: The processes and sampling of the run.
    sampling_seed: Seed of the per-round client sampling.
    state_manager: Saves and loads the training state; its latest version is
      the last completed round.
    release_managers: Receive each round's metrics, keyed by round number.
    checkpoint_every: Save the state every this many rounds (and always after
      the last one).
    eval_every: Run federated evaluation every this many rounds (0: never).
    on_round: Called after each round, once its metrics are released and
      its state saved if due. An exception it raises (e.g. KeyboardInterrupt
      to stop) ends training there, the saved state intact.
    runtime_metrics: Called after each round; its values (e.g. silos dropped)
      join the round's metrics.
    progress: Updated as rounds complete and are saved.

  Returns:
    A `TrainingResult`.

  Raises:
    RoundFailedError: If a round fails; the last checkpoint stays valid.
  """
  process = experiment.train_process
  initial_state = process.initialize()
  state, start_round = await state_manager.load_latest(initial_state)
  if state is None:
    state, start_round = initial_state, 0
  else:
    _log.info('resuming from the checkpoint of round %d', start_round)
  progress = progress if progress is not None else Progress()
  progress.rounds_completed = progress.last_checkpoint = start_round
  epsilon = epsilon_after(experiment, start_round)
  for round_num in range(start_round + 1, experiment.rounds + 1):
    started = time.monotonic()
    clients = client_sampling.sample_clients(
      experiment.train_client_ids,
      scheme=experiment.sampling,
      round_num=round_num,
      seed=sampling_seed,
    )
    try:
      output = process.next(state, experiment.round_input(clients))
    except Exception as e:
      raise RoundFailedError(
        f'round {round_num} failed ({len(clients)} clients): {describe_error(e)}. '
        'The last checkpoint is kept: fix the cause and rerun the same command '
        'to resume.'
      ) from e
    state = output.state
    values = {'clients': float(len(clients)), **_round_metrics(output)}
    if runtime_metrics is not None:
      values.update(runtime_metrics())
    epsilon = epsilon_after(experiment, round_num)
    if epsilon is not None:
      values['epsilon'] = epsilon
    if eval_every and round_num % eval_every == 0:
      eval_metrics = evaluate(experiment, process.get_model_weights(state))
      for name in model_metric_names(eval_metrics):
        values[f'eval_{name}'] = eval_metrics[name]
    values['round_seconds'] = time.monotonic() - started
    for manager in release_managers:
      await manager.release(values, key=round_num)
    progress.rounds_completed = round_num
    if round_num % checkpoint_every == 0 or round_num == experiment.rounds:
      await state_manager.save(state, round_num)
      progress.last_checkpoint = round_num
    if on_round is not None:
      on_round(
        RoundProgress(
          round=round_num,
          rounds=experiment.rounds,
          metrics=dict(values),
          epsilon=epsilon,
          last_checkpoint=progress.last_checkpoint,
        )
      )
  return TrainingResult(
    state=state,
    rounds_completed=experiment.rounds,
    resumed_from=start_round,
    epsilon=epsilon,
  )
