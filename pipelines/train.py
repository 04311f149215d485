r"""Trains a federated model, with user-level DP, on preprocessed client data.

    python -m pipelines.train --config=configs/digits_dp.py \
        [--config.training.rounds=50] [--output_dir=runs/digits_dp] [--overwrite]

Each round prints one line (round, clients, loss, accuracy, ε so far,
seconds). Rerunning the same command after an interruption resumes from the
last checkpoint. At the end it evaluates on the held-out clients, exports the
Keras model, writes the privacy report and a plot, and prints

    test_accuracy=<float>
    epsilon=<float>
    delta=<float>
    output_dir=<path>
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Workers are started with fork+exec while gRPC channels are open.
os.environ.setdefault('GRPC_ENABLE_FORK_SUPPORT', 'false')

# pylint: disable=g-import-not-at-top,wrong-import-position
import asyncio
import contextlib
import math
import sys

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf
import tensorflow_federated as tff

from computations import privacy_accounting
from configs import validation
from pipelines import experiment as experiment_lib
from pipelines import cli
from pipelines import manifest as manifest_lib
from pipelines import privacy_report
from pipelines import run_directory
from pipelines import training_loop
from pipelines import training_plot
from runtime import cross_silo
from runtime import execution_context
from runtime import isolated_worker
from runtime import shutdown
from runtime import tls as tls_lib

_CONFIG = cli.define_config_flag()
_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', None, 'Run directory; default runs/<config.name>.'
)
_SILOS = flags.DEFINE_string(
    'silos', None, 'Train across these silos: [name=]host:port,... (sets runtime.mode=silos).'
)
_TLS_CA = flags.DEFINE_string('tls_ca', None, 'CA certificate that signed the silos (PEM).')
_TLS_CERT = flags.DEFINE_string('tls_cert', None, "This coordinator's client certificate (PEM).")
_TLS_KEY = flags.DEFINE_string('tls_key', None, "This coordinator's private key (PEM).")
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Discard a previous run in --output_dir instead of resuming it.'
)

USER_ERRORS = (
    validation.ConfigError,
    manifest_lib.ManifestError,
    experiment_lib.ExperimentError,
    privacy_accounting.PrivacyAccountingError,
    run_directory.RunDirectoryError,
    isolated_worker.WorkerIsolationError,
    isolated_worker.WorkerStartError,
    training_loop.RoundFailedError,
    cross_silo.SiloError,
    cross_silo.FederationError,
    tls_lib.TlsConfigError,
)


def _export_model(experiment, model_weights, path: str) -> None:
  model = experiment.keras_model_builder()
  model_weights.assign_weights_to(model)
  tmp = f'{path}.tmp.keras'
  model.save(tmp)
  os.replace(tmp, path)


@contextlib.contextmanager
def open_runtime(config, run_dir: run_directory.RunDirectory):
  """The client data's manifest and the TFF runtime, local or across silos.

  Yields:
    (manifest, per-round runtime metrics function or None).
  """
  runtime = config.runtime
  if runtime.mode == 'local':
    manifest = manifest_lib.read_manifest(config.data.processed_dir)
    with execution_context.local_worker_context(
        config.data.processed_dir,
        log_path=run_dir.worker_log,
        allow_exposed_worker=runtime.allow_exposed_worker,
        max_concurrent_computation_calls=runtime.max_concurrent_computation_calls,
    ):
      yield manifest, None
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
  ) as fed:
    silos = ', '.join(
        f'{name} ({len([c for c in fed.manifest.split("train").clients if c.startswith(name + "/")])}'
        ' clients)' for name in sorted(fed.silos))
    print(f'silos: {silos}', flush=True)
    for name, reason in fed.unavailable.items():
      print(f'warning: silo {name} left out: {reason}', flush=True)
    yield fed.manifest, fed.context.pop_round_metrics


def run(config, output_dir: str, *, overwrite: bool = False) -> dict:
  """Runs or resumes training; returns the privacy report."""
  config = validation.validate(config)
  run_dir = run_directory.prepare(output_dir, config, overwrite=overwrite)
  with open_runtime(config, run_dir) as (manifest, runtime_metrics):
    experiment = experiment_lib.build_experiment(config, manifest)
    seed, seed_is_secret = run_directory.sampling_seed(run_dir, config.training.sampling_seed)
    _print_plan(experiment)
    state_manager = tff.program.FileProgramStateManager(
        run_dir.checkpoints, keep_total=config.training.keep_checkpoints
    )
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
  epsilon = result.epsilon if result.epsilon is not None else math.inf
  print(f'test_accuracy={test_metrics["accuracy"]:.4f}')
  print(f'epsilon={epsilon:.4f}')
  print(f'delta={report["delta"] if report["delta"] is not None else 0.0:g}')
  print(f'output_dir={run_dir.root}', flush=True)
  return report


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


def _apply_runtime_flags(config) -> None:
  runtime = config.runtime
  if _SILOS.value:
    runtime.silos = _SILOS.value
    runtime.mode = 'silos'
  for flag, field in ((_TLS_CA, 'tls_ca'), (_TLS_CERT, 'tls_cert'), (_TLS_KEY, 'tls_key')):
    if flag.value:
      runtime[field] = flag.value


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    cli.fail(f'unexpected argument(s) {" ".join(argv[1:])}; this program takes flags only.')
  tf.get_logger().setLevel('ERROR')
  logging.set_verbosity(logging.WARNING)
  config = cli.load_config(_CONFIG)
  _apply_runtime_flags(config)
  output_dir = _OUTPUT_DIR.value or os.path.join('runs', config.name)
  try:
    with shutdown.graceful_termination():
      run(config, output_dir, overwrite=_OVERWRITE.value)
  except USER_ERRORS as e:
    cli.fail(str(e))
  return 0


if __name__ == '__main__':
  app.run(
      lambda argv: sys.exit(main(argv)),
      flags_parser=lambda argv: cli.parse_flags(argv, known_only=False),
  )
