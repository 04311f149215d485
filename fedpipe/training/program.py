"""A training run from a validated config: runtime, loop, evaluation, outputs.

The logic behind `fedpipe-train` (which only adds flags), usable
from other programs (the cross-silo demo, benchmarks) without flag clashes.
"""

import asyncio
import contextlib
import json
import math
import os

import tensorflow as tf
import tensorflow_federated as tff
from absl import logging

from fedpipe.config import validation
from fedpipe.data import manifest as manifest_lib
from fedpipe.federation import cross_silo
from fedpipe.federation import tls as tls_lib
from fedpipe.runtime import execution_context
from fedpipe.training import experiment as experiment_lib
from fedpipe.training import loop as training_loop
from fedpipe.training import plot as training_plot
from fedpipe.training import privacy_report, run_directory
from fedpipe.training import study as study_lib


def quiet_logs() -> None:
  """Keeps TensorFlow's and absl's INFO chatter out of a program's output."""
  tf.get_logger().setLevel('ERROR')
  logging.set_verbosity(logging.WARNING)


def _export_model(experiment, model_weights, path: str) -> None:
  """Saves the trained weights as a Keras model (`model.keras`)."""
  model = experiment.keras_model_builder()
  model_weights.assign_weights_to(model)
  tmp = f'{path}.tmp.keras'
  model.save(tmp)
  os.replace(tmp, path)


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
    print(f'silos: {silos}', flush=True)
    for name, reason in fed.unavailable.items():
      print(f'warning: silo {name} left out: {reason}', flush=True)
    yield fed.manifest, fed.context.pop_round_metrics, fed


def _completed_rounds(state_manager: tff.program.FileProgramStateManager) -> int:
  versions = asyncio.run(state_manager.get_versions())
  return max(versions) if versions else 0


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
  for s in statuses:
    if s.status is None:
      print(
        f'warning: silo {s.silo} is ungoverned: it runs any computation of any caller '
        'with a valid certificate',
        flush=True,
      )
    else:
      print(
        f'study {request.study_id} approved by {s.silo}: '
        f'{s.status["rounds_remaining"]} of {s.status["rounds_approved"]} rounds and '
        f'{s.status["evaluations_remaining"]} of {s.status["evaluations_approved"]} '
        'evaluations left',
        flush=True,
      )


def submit_study(config, output_dir: str) -> str:
  """Submits the run's study to every silo and prints each silo's answer.

  Returns:
    The study id.
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
      print(f'study {request.study_id}: approved by every silo', flush=True)
    except study_lib.StudyNotApprovedError as e:
      print(str(e).split('\nRerun', 1)[0], flush=True)
  print(f'study_id={request.study_id}', flush=True)
  return request.study_id


def run(
  config,
  output_dir: str,
  *,
  overwrite: bool = False,
  progress: training_loop.Progress | None = None,
) -> dict:
  """Runs or resumes training; returns the privacy report.

  Args:
    config: The experiment config.
    output_dir: The run directory; locked for the whole run, so a second run
      on it is refused (`run_directory.lock`).
    overwrite: Discard a previous run in `output_dir` instead of resuming it.
    progress: Updated as rounds complete, for a caller that is interrupted.

  Returns:
    The privacy report.
  """
  config = validation.validate(config)
  with run_directory.lock(output_dir):
    return _run_locked(config, output_dir, overwrite=overwrite, progress=progress)


def _run_locked(
  config, output_dir: str, *, overwrite: bool, progress: training_loop.Progress | None
) -> dict:
  run_dir = run_directory.prepare(output_dir, config, overwrite=overwrite)
  finished = _finished_report(run_dir, config)
  if finished is not None:
    # Evaluating again would release the same metrics once more (and cost an
    # evaluation of every governed silo's budget) for nothing new.
    print(
      f'the run in {run_dir.root} is complete ({finished["rounds"]} rounds); its results '
      'stand (rerun with --overwrite to train again)',
      flush=True,
    )
    _print_results(finished, run_dir)
    return finished
  with open_runtime(config, run_dir) as (manifest, runtime_metrics, fed):
    experiment = experiment_lib.build_experiment(config, manifest)
    seed, seed_is_secret = run_directory.sampling_seed(run_dir, config.training.sampling_seed)
    _print_plan(experiment)
    state_manager = tff.program.FileProgramStateManager(
      run_dir.checkpoints, keep_total=config.training.keep_checkpoints
    )
    if fed is not None:
      _check_study(config, experiment, fed, completed_rounds=_completed_rounds(state_manager))
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
        report=lambda line: print(line, flush=True),
        runtime_metrics=runtime_metrics,
        progress=progress,
      )
    )
    weights = experiment.train_process.get_model_weights(result.state)
    test_metrics = training_loop.evaluate(experiment, weights)
  _export_model(experiment, weights, run_dir.model)
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
  _print_results(report, run_dir)
  return report


def _finished_report(run_dir: run_directory.RunDirectory, config) -> dict | None:
  """The report of a run in `run_dir` that already completed `config`'s rounds, else None."""
  try:
    with open(os.path.join(run_dir.root, privacy_report.JSON_FILENAME), encoding='utf-8') as f:
      report = json.load(f)
  except (OSError, ValueError):
    return None
  if report.get('rounds') != config.training.rounds or not os.path.exists(run_dir.model):
    return None
  state_manager = tff.program.FileProgramStateManager(run_dir.checkpoints)
  if _completed_rounds(state_manager) != config.training.rounds:
    return None
  return report


def _print_results(report: dict, run_dir: run_directory.RunDirectory) -> None:
  epsilon = report.get('epsilon')
  print(f'test_accuracy={report["test_accuracy"]:.4f}')
  print(f'epsilon={epsilon if epsilon is not None else math.inf:.4f}')
  print(f'delta={report["delta"] if report["delta"] is not None else 0.0:g}')
  print(f'output_dir={run_dir.root}', flush=True)


def _print_plan(experiment) -> None:
  if experiment.privacy:
    p = experiment.privacy
    print(
      f'DP-FedAvg: noise_multiplier={p.noise_multiplier:.4g} clipping={p.clipping}'
      f' weight_cap={p.weight_cap:g} population={experiment.sampling.population_size}'
      f' clients_per_round={experiment.sampling.clients_per_round} ({experiment.sampling.method})'
      f' rounds={experiment.rounds} delta={p.delta:g}',
      flush=True,
    )
  else:
    print('FedAvg without differential privacy', flush=True)
