"""The round loop's program logic with fakes: resuming, checkpoints, evaluation, failures, progress.

In the manner of TFF's program-logic tests: a fake learning process (its
state counts the rounds run), an in-memory program state manager and a
recording release manager, so every test runs in milliseconds without a
TFF worker.
"""

import asyncio
import dataclasses
import types
from typing import Any

import pytest
import tensorflow_federated as tff

from fedpipe.computations import client_sampling, privacy_accounting
from fedpipe.training import experiment as experiment_lib
from fedpipe.training import loop as training_loop

POPULATION = 20
SEED = 7


@dataclasses.dataclass
class FakeOutput:
  state: Any
  metrics: dict


class FakeTrainProcess:
  """A LearningProcess's interface; the state is the number of rounds run."""

  def __init__(self, fail_at_round: int | None = None):
    self.fail_at_round = fail_at_round
    self.rounds_run: list[int] = []
    self.clients: dict[int, list[str]] = {}

  def initialize(self) -> dict:
    return {'rounds_run': 0}

  def next(self, state: dict, clients: list[str]) -> FakeOutput:
    round_num = state['rounds_run'] + 1
    if round_num == self.fail_at_round:
      raise RuntimeError('the worker went away')
    self.rounds_run.append(round_num)
    self.clients[round_num] = list(clients)
    train = {'loss': 1.0 / round_num, 'accuracy': 0.1 * round_num, 'num_examples': 3 * len(clients)}
    return FakeOutput({'rounds_run': round_num}, {'client_work': {'train': train}})

  def get_model_weights(self, state: dict) -> tuple[str, int]:
    return ('weights', state['rounds_run'])


class FakeEvalProcess:
  """A federated evaluation's interface; records the weights it evaluated."""

  def __init__(self):
    self.evaluated: list[tuple[str, int]] = []

  def initialize(self) -> None:
    return None

  def set_model_weights(self, state: None, weights: tuple[str, int]) -> tuple[str, int]:
    return weights

  def next(self, weights: tuple[str, int], clients: list[str]) -> FakeOutput:
    self.evaluated.append(weights)
    metrics = {'loss': 0.5, 'accuracy': 0.8, 'num_examples': 10.0}
    return FakeOutput(weights, {'client_work': {'eval': {'current_round_metrics': metrics}}})


class MemoryStateManager(tff.program.ProgramStateManager):
  """Program state kept in a dict, version -> state; records every save."""

  def __init__(self, saved: dict[int, Any] | None = None):
    self.saved = dict(saved or {})
    self.saves: list[int] = []

  async def get_versions(self) -> list[int] | None:
    return sorted(self.saved) or None

  async def load(self, version: int, structure: Any) -> Any:
    if version not in self.saved:
      raise tff.program.ProgramStateNotFoundError(version)
    return self.saved[version]

  async def save(self, program_state: Any, version: int) -> None:
    self.saved[version] = program_state
    self.saves.append(version)


class RecordingReleaseManager(tff.program.ReleaseManager):
  """Records every release, in order."""

  def __init__(self):
    self.released: list[tuple[int, dict]] = []

  async def release(self, value: Any, key: int) -> None:
    self.released.append((key, dict(value)))


def _experiment(rounds: int, *, fail_at_round: int | None = None, dp: bool = False):
  privacy = None
  if dp:  # Only what the accountant reads.
    privacy = types.SimpleNamespace(
      noise_multiplier=1.0, delta=1e-5, accountant='rdp', placement='central'
    )
  return experiment_lib.Experiment(
    train_process=FakeTrainProcess(fail_at_round),
    eval_process=FakeEvalProcess(),
    train_client_ids=[f'client-{i:02d}' for i in range(POPULATION)],
    eval_client_ids=['eval-0', 'eval-1'],
    sampling=privacy_accounting.SamplingScheme('poisson', POPULATION, 5),
    rounds=rounds,
    privacy=privacy,
    num_features=4,
    num_classes=2,
    keras_model_builder=None,
  )


def _train(experiment, state_manager=None, **kwargs):
  """Runs the loop; returns (result, state manager, release manager, progress events)."""
  state_manager = state_manager if state_manager is not None else MemoryStateManager()
  releases = RecordingReleaseManager()
  events = []
  result = asyncio.run(
    training_loop.train(
      experiment,
      sampling_seed=SEED,
      state_manager=state_manager,
      release_managers=[releases],
      on_round=kwargs.pop('on_round', events.append),
      **kwargs,
    )
  )
  return result, state_manager, releases, events


def test_a_fresh_run_runs_every_round_and_reports_each_once():
  experiment = _experiment(3)
  result, states, releases, events = _train(experiment)
  assert experiment.train_process.rounds_run == [1, 2, 3]
  assert [key for key, _ in releases.released] == [1, 2, 3]
  assert [e.round for e in events] == [1, 2, 3]
  assert {e.rounds for e in events} == {3}
  assert events[-1].metrics == releases.released[-1][1]
  assert events[0].metrics['train_loss'] == 1.0 and events[0].epsilon is None
  assert result.rounds_completed == 3 and result.resumed_from == 0
  assert result.state == {'rounds_run': 3} and result.epsilon is None
  assert states.saves == [1, 2, 3]


def test_resuming_continues_after_the_saved_round_and_reruns_nothing():
  experiment = _experiment(5)
  states = MemoryStateManager({1: {'rounds_run': 1}, 2: {'rounds_run': 2}})
  progress = training_loop.Progress()
  result, _, releases, events = _train(experiment, states, progress=progress)
  assert experiment.train_process.rounds_run == [3, 4, 5]
  assert [key for key, _ in releases.released] == [3, 4, 5]
  assert [e.round for e in events] == [3, 4, 5]
  assert result.resumed_from == 2 and result.state == {'rounds_run': 5}
  assert states.saves == [3, 4, 5]
  assert (progress.rounds_completed, progress.last_checkpoint) == (5, 5)
  # Sampling is a function of (seed, round): the clients an uninterrupted run would draw.
  for round_num in (3, 4, 5):
    assert experiment.train_process.clients[round_num] == client_sampling.sample_clients(
      experiment.train_client_ids, scheme=experiment.sampling, round_num=round_num, seed=SEED
    )


def test_a_complete_run_resumed_runs_no_round():
  experiment = _experiment(2)
  states = MemoryStateManager({2: {'rounds_run': 2}})
  result, _, releases, events = _train(experiment, states)
  assert experiment.train_process.rounds_run == [] and releases.released == [] and events == []
  assert result.state == {'rounds_run': 2} and result.resumed_from == 2


def test_checkpoints_every_n_rounds_and_after_the_last():
  experiment = _experiment(7)
  _, states, _, events = _train(experiment, checkpoint_every=3)
  assert states.saves == [3, 6, 7]
  assert [e.last_checkpoint for e in events] == [0, 0, 3, 3, 3, 6, 7]


def test_evaluates_every_n_rounds_and_releases_the_evaluation_with_the_round():
  experiment = _experiment(5)
  _, _, releases, events = _train(experiment, eval_every=2)
  assert experiment.eval_process.evaluated == [('weights', 2), ('weights', 4)]
  evaluated = [key for key, values in releases.released if 'eval_accuracy' in values]
  assert evaluated == [2, 4]
  assert releases.released[1][1]['eval_loss'] == 0.5
  assert [e.round for e in events if 'eval_accuracy' in e.metrics] == [2, 4]


def test_no_evaluation_during_training_when_eval_every_is_zero():
  experiment = _experiment(3)
  _train(experiment, eval_every=0)
  assert experiment.eval_process.evaluated == []


def test_a_failed_round_names_the_round_and_keeps_the_last_checkpoint():
  experiment = _experiment(6, fail_at_round=5)
  states = MemoryStateManager()
  progress = training_loop.Progress()
  with pytest.raises(training_loop.RoundFailedError) as error:
    _train(experiment, states, checkpoint_every=2, progress=progress)
  message = str(error.value)
  assert message.startswith('round 5 failed (')
  assert 'RuntimeError: the worker went away' in message and 'rerun' in message
  assert states.saves == [2, 4] and states.saved[4] == {'rounds_run': 4}
  assert (progress.rounds_completed, progress.last_checkpoint) == (4, 4)

  # Rerun: resumes from round 4's checkpoint and finishes.
  experiment.train_process.fail_at_round = None
  result, _, releases, _ = _train(experiment, states, checkpoint_every=2)
  assert [key for key, _ in releases.released] == [5, 6]
  assert result.state == {'rounds_run': 6} and result.resumed_from == 4


def test_a_round_released_but_not_yet_saved_is_rerun_on_resume():
  experiment = _experiment(4, fail_at_round=4)
  states = MemoryStateManager()
  with pytest.raises(training_loop.RoundFailedError, match='round 4 failed'):
    _train(experiment, states, checkpoint_every=2)
  assert states.saves == [2]
  experiment.train_process.fail_at_round = None
  experiment.train_process.rounds_run.clear()
  _train(experiment, states, checkpoint_every=2)
  assert experiment.train_process.rounds_run == [3, 4]


def test_a_callback_that_raises_stops_after_its_round_with_the_round_saved():
  experiment = _experiment(5)
  states = MemoryStateManager()
  seen = []

  def stop_at_two(progress):
    seen.append(progress.round)
    if progress.round == 2:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    _train(experiment, states, on_round=stop_at_two)
  assert seen == [1, 2] and experiment.train_process.rounds_run == [1, 2]
  assert states.saves == [1, 2]


def test_epsilon_is_reported_per_round_with_dp():
  experiment = _experiment(3, dp=True)
  result, _, releases, events = _train(experiment)
  expected = [
    privacy_accounting.compute_epsilon(
      noise_multiplier=1.0, sampling=experiment.sampling, rounds=r, delta=1e-5, accountant='rdp'
    )
    for r in (1, 2, 3)
  ]
  assert [e.epsilon for e in events] == pytest.approx(expected)
  assert [values['epsilon'] for _, values in releases.released] == pytest.approx(expected)
  assert result.epsilon == pytest.approx(expected[-1])
  assert expected[0] < expected[1] < expected[2]


def test_runtime_metrics_join_the_round_and_the_progress_line():
  experiment = _experiment(1)
  _, _, releases, events = _train(experiment, runtime_metrics=lambda: {'dropped_silos': 1.0})
  assert releases.released[0][1]['dropped_silos'] == 1.0
  line = training_loop.format_progress(events[0])
  assert line.startswith('round 1/1  clients=') and 'dropped_silos=1' in line
  assert line.endswith('s') and 'loss=1.0000' in line
