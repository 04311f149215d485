"""A training run from a validated config: runtime, loop, evaluation, outputs.

`execute` runs or resumes a run in its directory and returns a `TrainResult`.
It is what `fedpipe.training.federated_training.train` (the library call a
notebook makes) and so `fedpipe-train` (which only adds flags) run, usable
from other programs (the cross-silo demo, benchmarks) without flag clashes.

It prints nothing. What a run has to say besides its rounds (the plan, the
silos, study approvals, resuming) goes to the `fedpipe` logger: INFO for
news, WARNING for what needs attention. Programs show it on stdout with
`print_messages`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from typing import TextIO

import tensorflow as tf
import tensorflow_federated as tff
from absl import logging as absl_logging

from fedpipe.computations import keras_model
from fedpipe.config import validation
from fedpipe.data import atomic_files, record_schema
from fedpipe.data import manifest as manifest_lib
from fedpipe.errors import FedpipeError
from fedpipe.federation import cross_silo, secure_round
from fedpipe.federation import tls as tls_lib
from fedpipe.runtime import execution_context
from fedpipe.training import experiment as experiment_lib
from fedpipe.training import loop as training_loop
from fedpipe.training import plot as training_plot
from fedpipe.training import privacy_report, run_directory
from fedpipe.training import study as study_lib

_log = logging.getLogger(__name__)
MESSAGES_LOGGER = 'fedpipe'


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """A finished run.

  Attributes:
    model: A Keras model holding the trained weights (uncompiled: compile
      it to `evaluate` or `fit` it locally; `predict` works as is).
    metrics: One dict per round, as in `metrics.csv`: 'round', clients,
      train_loss, train_accuracy, train_examples, round_seconds, and where
      they apply epsilon, clip_norm, eval_loss, eval_accuracy, dropped_silos.
    privacy: The privacy report (`privacy.report` is its dict).
    test_metrics: The final federated evaluation on the held-out clients:
      loss, num_examples and the label task's metrics (accuracy; for
      'binary' also auc; for 'regression' mae and rmse instead).
    output_dir: The run directory (checkpoints, metrics, model.keras,
      privacy_report.{json,txt}, training_curves.png); training again with
      it resumes or, if complete, returns this result again.
  """

  model: tf.keras.Model
  metrics: list[dict[str, float]]
  privacy: privacy_report.PrivacyReport
  test_metrics: dict[str, float]
  output_dir: str

  def summary(self) -> str:
    """The lines `fedpipe-train` ends with: test_accuracy= (or test_mae=, ...), epsilon=, delta=, output_dir=."""
    epsilon = self.privacy.epsilon
    others = [n for n in self.test_metrics if n not in ('accuracy', 'loss', 'num_examples')]
    if 'accuracy' in self.test_metrics or not others:
      others.insert(0, 'accuracy')  # The classifiers' line, as always.
    return '\n'.join(
      [
        *(f'test_{name}={self.test_metrics.get(name, math.nan):.4f}' for name in others),
        f'epsilon={epsilon if epsilon is not None else math.inf:.4f}',
        f'delta={self.privacy.delta if self.privacy.delta is not None else 0.0:g}',
        f'output_dir={self.output_dir}',
      ]
    )


def quiet_logs() -> None:
  """Keeps TensorFlow's and absl's INFO chatter out of a program's output."""
  tf.get_logger().setLevel('ERROR')
  absl_logging.set_verbosity(absl_logging.WARNING)


def print_messages(stream: TextIO | None = None) -> None:
  """Shows a run's messages (the `fedpipe` logger, INFO and up) one line each, as programs do.

  Args:
    stream: Where to write; default stdout at the time of each message.
  """
  logger = logging.getLogger(MESSAGES_LOGGER)
  for handler in list(logger.handlers):
    if getattr(handler, 'fedpipe_messages', False):
      logger.removeHandler(handler)
  handler = _MessageHandler(stream)
  handler.fedpipe_messages = True
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False  # absl's root handler would print them again, to stderr.


class _MessageHandler(logging.StreamHandler):
  """Writes bare messages to a stream (default: `sys.stdout` when the message comes)."""

  def __init__(self, stream: TextIO | None):
    super().__init__(stream)
    self._fixed = stream is not None
    self.setFormatter(logging.Formatter('%(message)s'))

  def emit(self, record: logging.LogRecord) -> None:
    if not self._fixed:
      self.stream = sys.stdout
    super().emit(record)


def _export_model(
  builder: keras_model.KerasModelBuilder, model_weights, run_dir: run_directory.RunDirectory
) -> tf.keras.Model:
  """The trained model, saved as `model.keras` (or its weights, if Keras cannot save it whole)."""
  model = builder()
  model_weights.assign_weights_to(model)
  try:
    with atomic_files.replacing(run_dir.model, suffix='.keras') as tmp:
      model.save(tmp)
  except (NotImplementedError, TypeError, ValueError) as e:
    # E.g. a custom layer without get_config(): the model function rebuilds it.
    with atomic_files.replacing(run_dir.model_weights, suffix='.h5') as tmp:
      model.save_weights(tmp)
    _log.warning(
      'warning: Keras cannot save the model whole (%s); its weights are in %s',
      ' '.join(str(e).split())[:200],
      run_dir.model_weights,
    )
  return model


def _saved_model(
  run_dir: run_directory.RunDirectory,
  config,
  keras_model_builder: keras_model.KerasModelBuilder | None,
) -> tf.keras.Model:
  """The trained model of a complete run, from its files."""
  record = run_directory.read_model_record(run_dir)
  if record is None:  # A run from before model records: model.keras is all there is.
    return tf.keras.models.load_model(run_dir.model, compile=False)
  label_task = record.get('label_task', record_schema.MULTICLASS)
  builder = keras_model_builder or experiment_lib.keras_builder(
    config,
    num_features=record['num_features'],
    num_classes=record['num_classes'],
    label_task=label_task,
  )
  run_directory.check_model(
    run_dir,
    architecture=keras_model.architecture(builder),
    num_features=record['num_features'],
    num_classes=record['num_classes'],
    label_task=label_task,
  )
  model = builder()
  model.load_weights(run_dir.model if os.path.exists(run_dir.model) else run_dir.model_weights)
  return model


@contextlib.contextmanager
def open_runtime(config, run_dir: run_directory.RunDirectory):
  """The client data's manifest and the TFF runtime, local or across silos.

  Yields:
    (manifest, per-round runtime metrics function or None, the
    `cross_silo.Federation` or None).
  """
  runtime = config.runtime
  if runtime.mode == 'local':
    manifest = manifest_lib.read_manifest(config.data.processed_dir)
    with execution_context.local_worker_context(
      config.data.processed_dir,
      log_path=run_dir.worker_log,
      allow_exposed_worker=runtime.allow_exposed_worker,
      allow_unconfined_worker=runtime.allow_unconfined_worker,
      max_concurrent_computation_calls=runtime.max_concurrent_computation_calls,
    ):
      yield manifest, None, None
    return
  with cross_silo.federation(
    cross_silo.parse_silos(runtime.silos),
    tls_lib.TlsFiles(ca=runtime.tls_ca, cert=runtime.tls_cert, key=runtime.tls_key),
    on_failure=runtime.on_silo_failure,
    round_timeout_s=runtime.silo_round_timeout_s,
    connect_timeout_s=runtime.silo_connect_timeout_s,
    min_silos_per_round=runtime.min_silos_per_round,
    server_log_path=run_dir.worker_log,
    allow_exposed_worker=runtime.allow_exposed_worker,
    allow_unconfined_worker=runtime.allow_unconfined_worker,
  ) as fed:
    silos = ', '.join(
      f'{name} ({len([c for c in fed.manifest.split("train").clients if c.startswith(name + "/")])}'
      ' clients)'
      for name in sorted(fed.silos)
    )
    _log.info('silos: %s', silos)
    for name, reason in fed.unavailable.items():
      _log.warning('warning: silo %s left out: %s', name, reason)
    yield fed.manifest, fed.context.pop_round_metrics, fed


def _study_request(config, experiment, fed):
  evaluations = study_lib.evaluations_needed(
    rounds=experiment.rounds, eval_every=config.training.eval_every
  )
  return study_lib.build_study_request(
    experiment, fed.context, name=config.name, evaluations=evaluations
  )


def _check_study(config, experiment, fed, completed_rounds: int) -> None:
  """Submits the run's study to governed silos; raises unless all approve."""
  request = _study_request(config, experiment, fed)
  statuses = study_lib.submit_and_check(
    fed,
    request,
    rounds_needed=experiment.rounds - completed_rounds,
    evaluations_needed=study_lib.evaluations_needed(
      rounds=experiment.rounds,
      eval_every=config.training.eval_every,
      completed_rounds=completed_rounds,
    ),
  )
  privacy = experiment.privacy
  if privacy is not None and privacy.placement == 'secure':
    ungoverned = sorted(s.silo for s in statuses if s.status is None)
    if ungoverned:
      raise study_lib.StudyNotApprovedError(
        f'dp.placement=secure needs governed silos; {", ".join(ungoverned)} run ungoverned '
        '(--allow_ungoverned) and cannot hold a study to secure-aggregation terms',
        study_id=request.study_id,
        silos=tuple(ungoverned),
      )
    fed.context.enable_secure(
      secure_round.SecureStudy(request.study_id, privacy.secure_terms()),
      experiment.train_process.next,
    )
    _log.info(
      'secure aggregation: %d silos, noise added at the silos (distributed discrete '
      'Gaussian, up to %d colluding), masked sums only',
      len(privacy.secure_roster),
      privacy.max_colluding,
    )
  for s in statuses:
    if s.status is None:
      _log.warning(
        'warning: silo %s is ungoverned: it runs any computation of any caller '
        'with a valid certificate',
        s.silo,
      )
    else:
      _log.info(
        'study %s approved by %s: %s of %s rounds and %s of %s evaluations left',
        request.study_id,
        s.silo,
        s.status.rounds_remaining,
        s.status.rounds_approved,
        s.status.evaluations_remaining,
        s.status.evaluations_approved,
      )


def submit_study(config, output_dir: str) -> str:
  """Submits the run's study to every silo; logs each silo's answer.

  Args:
    config: The experiment config (runtime.mode=silos).
    output_dir: The run directory (its lock is the caller's to hold).

  Returns:
    The study id.

  Raises:
    fedpipe.config.validation.ConfigError: If the config is invalid or not
      for silos.
  """
  config = validation.validate(config)
  if config.runtime.mode != 'silos':
    raise validation.ConfigError(
      ['a study is submitted to silos: give --silos (runtime.mode=silos)']
    )
  run_dir = run_directory.prepare(output_dir, config, overwrite=False)
  with open_runtime(config, run_dir) as (manifest, _, fed):
    experiment = experiment_lib.build_experiment(config, manifest)
    request = _study_request(config, experiment, fed)
    try:
      study_lib.submit_and_check(
        fed, request, rounds_needed=experiment.rounds, evaluations_needed=request.evaluations
      )
      _log.info('study %s: approved by every silo', request.study_id)
    except study_lib.StudyNotApprovedError as e:
      _log.info('%s', str(e).split('\nRerun', 1)[0])
  return request.study_id


def execute(
  config,
  output_dir: str,
  *,
  keras_model_builder: keras_model.KerasModelBuilder | None = None,
  overwrite: bool = False,
  on_round: Callable[[training_loop.RoundProgress], None] | None = None,
  progress: training_loop.Progress | None = None,
) -> TrainResult:
  """Runs or resumes training in `output_dir`, or returns its result if it is complete.

  Runs `asyncio.run`: call it where no event loop is running in this thread
  (`fedpipe.training.federated_training.train` sees to that).

  Args:
    config: The experiment config; validated here.
    output_dir: The run directory; locked for the whole run, so a second run
      on it is refused (`run_directory.lock`). A run in it with the same
      config and model resumes from its last checkpoint.
    keras_model_builder: Builds the model; None: the one `config.model` names.
    overwrite: Discard a previous run in `output_dir` instead of resuming it.
    on_round: Called after each round (`training_loop.train`).
    progress: Updated as rounds complete, for a caller that is interrupted.

  Returns:
    The `TrainResult`.

  Raises:
    fedpipe.errors.FedpipeError: For a problem the user can fix: the config,
      the data, the model, the run directory, a silo, a failed round.
  """
  config = validation.validate(config)
  root = os.path.abspath(output_dir)
  new_directory = not os.path.lexists(root) or (os.path.isdir(root) and not os.listdir(root))
  try:
    with run_directory.lock(output_dir):
      return _execute_locked(
        config,
        output_dir,
        keras_model_builder=keras_model_builder,
        overwrite=overwrite,
        on_round=on_round,
        progress=progress,
      )
  except FedpipeError as e:
    # A run refused before its first round (the data, the model, the DP
    # parameters) leaves nothing behind. A failed round keeps its directory:
    # its worker log says why, and a rerun resumes.
    if new_directory and not isinstance(e, training_loop.RoundFailedError):
      run_directory.remove_unstarted(root)
    raise


def run(
  config,
  output_dir: str,
  *,
  overwrite: bool = False,
  progress: training_loop.Progress | None = None,
) -> dict:
  """Runs or resumes training; returns the privacy report as a dict (`execute` returns all).

  Args:
    config: The experiment config.
    output_dir: The run directory (see `execute`).
    overwrite: Discard a previous run in `output_dir` instead of resuming it.
    progress: Updated as rounds complete, for a caller that is interrupted.

  Returns:
    The privacy report, as in `privacy_report.json`.
  """
  return execute(config, output_dir, overwrite=overwrite, progress=progress).privacy.as_dict()


def _execute_locked(
  config,
  output_dir: str,
  *,
  keras_model_builder: keras_model.KerasModelBuilder | None,
  overwrite: bool,
  on_round: Callable[[training_loop.RoundProgress], None] | None,
  progress: training_loop.Progress | None,
) -> TrainResult:
  run_dir = run_directory.prepare(output_dir, config, overwrite=overwrite)
  finished = _finished_report(run_dir, config)
  if finished is not None:
    # Evaluating again would release the same metrics once more (and cost an
    # evaluation of every governed silo's budget) for nothing new.
    _log.info(
      'the run in %s is complete (%s rounds); its results stand (rerun with --overwrite, '
      'or overwrite=True, to train again)',
      run_dir.root,
      finished['rounds'],
    )
    return _result(_saved_model(run_dir, config, keras_model_builder), finished, run_dir)
  with open_runtime(config, run_dir) as (manifest, runtime_metrics, fed):
    experiment = experiment_lib.build_experiment(
      config, manifest, keras_model_builder=keras_model_builder
    )
    run_directory.check_model(
      run_dir,
      architecture=keras_model.architecture(experiment.keras_model_builder),
      num_features=experiment.num_features,
      num_classes=experiment.num_classes,
      label_task=experiment.label_task,
    )
    seed, seed_is_secret = run_directory.sampling_seed(run_dir, config.training.sampling_seed)
    _log_plan(experiment)
    state_manager = tff.program.FileProgramStateManager(
      run_dir.checkpoints, keep_total=config.training.keep_checkpoints
    )
    if fed is not None:
      _check_study(config, experiment, fed, completed_rounds=run_dir.last_checkpoint())
    release_managers = [
      tff.program.CSVFileReleaseManager(run_dir.metrics_csv, key_fieldname='key'),
      tff.program.TensorBoardReleaseManager(run_dir.tensorboard),
    ]
    result = asyncio.run(
      training_loop.train(
        experiment,
        sampling_seed=seed,
        state_manager=state_manager,
        release_managers=release_managers,
        checkpoint_every=config.training.checkpoint_every,
        eval_every=config.training.eval_every,
        on_round=on_round,
        runtime_metrics=runtime_metrics,
        progress=progress,
      )
    )
    weights = experiment.train_process.get_model_weights(result.state)
    test_metrics = training_loop.evaluate(experiment, weights)
  model = _export_model(experiment.keras_model_builder, weights, run_dir)
  report = privacy_report.build_report(
    experiment,
    rounds=result.rounds_completed,
    epsilon=result.epsilon,
    test_metrics=test_metrics,
    sampling_seed_is_secret=seed_is_secret,
  )
  privacy_report.write_report(run_dir.root, report)
  training_plot.plot_training_curves(
    run_dir.metrics_csv, run_dir.root, title=f'{config.name}: {experiment.rounds} rounds'
  )
  return _result(model, report, run_dir)


def _result(
  model: tf.keras.Model, report: dict, run_dir: run_directory.RunDirectory
) -> TrainResult:
  names = {'accuracy': 'test_accuracy', 'loss': 'test_loss', 'num_examples': 'test_examples'}
  for key in report:  # The label task's other metrics (auc; mae, rmse).
    if key.startswith('test_') and key not in names.values() and key != 'test_examples':
      names[key[len('test_') :]] = key
  test_metrics = {
    name: float(report[key]) for name, key in names.items() if report.get(key) is not None
  }
  return TrainResult(
    model=model,
    metrics=run_dir.read_metrics(),
    privacy=privacy_report.PrivacyReport.from_dict(report),
    test_metrics=test_metrics,
    output_dir=run_dir.root,
  )


def _finished_report(run_dir: run_directory.RunDirectory, config) -> dict | None:
  """The report of a run in `run_dir` that already completed `config`'s rounds, else None."""
  try:
    with open(os.path.join(run_dir.root, privacy_report.JSON_FILENAME), encoding='utf-8') as f:
      report = json.load(f)
  except (OSError, ValueError):
    return None
  if report.get('rounds') != config.training.rounds:
    return None
  if not (os.path.exists(run_dir.model) or os.path.exists(run_dir.model_weights)):
    return None
  if run_dir.last_checkpoint() != config.training.rounds:
    return None
  return report


def _log_plan(experiment) -> None:
  if experiment.privacy:
    p = experiment.privacy
    _log.info(
      'DP-FedAvg: noise_multiplier=%.4g clipping=%s weight_cap=%g population=%d '
      'clients_per_round=%d (%s) rounds=%d delta=%g',
      p.noise_multiplier,
      p.clipping,
      p.weight_cap,
      experiment.sampling.population_size,
      experiment.sampling.clients_per_round,
      experiment.sampling.method,
      experiment.rounds,
      p.delta,
    )
  else:
    _log.info('FedAvg without differential privacy')
  _log.info(
    'engine: %s',
    "cohort (a round's users trained as cohorts, one vectorized call each)"
    if experiment.engine == 'cohort'
    else 'per_client (one TFF client per user)',
  )
