r"""Cross-silo training on one machine: three silo servers on loopback, then training.

    fedpipe-demo-silos --config=configs/digits_dp.py [--num_silos=3]

Splits the config's bundled raw data by client into `--num_silos` silos,
runs the preprocessing pipeline for each (as each data owner would), makes a
CA and certificates, starts one `fedpipe-silo` process per silo on
127.0.0.1, trains across them over mutual TLS, and stops the silos.
Everything goes under `--work_dir` (default `runs/<config.name>-silos`).
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('GRPC_ENABLE_FORK_SUPPORT', 'false')

import subprocess
import sys

from absl import app, flags
from ml_collections import config_flags

from fedpipe.cli import entrypoint as cli
from fedpipe.datasets import silo_partition
from fedpipe.errors import FedpipeError
from fedpipe.federation import cross_silo, local_federation
from fedpipe.pipelines import feature_spec as feature_spec_lib
from fedpipe.pipelines import federated_statistics
from fedpipe.runtime import shutdown

# TensorFlow must be imported before absl runs main(): imported inside it,
# its eager context starts without eager mode on its switch stack, and Keras
# then builds graph placeholders instead of eager models.
from fedpipe.training import federated_training
from fedpipe.training import program as training_program

_CONFIG = cli.define_config_flag()
_NUM_SILOS = flags.DEFINE_integer('num_silos', 3, 'Number of silos.')
_WORK_DIR = flags.DEFINE_string('work_dir', None, 'Default runs/<config.name>-silos.')


def prepare_silo_data(config, work_dir: str, num_silos: int) -> dict[str, str]:
  """Splits the raw data by client; each silo runs the preprocessing program.

  A draft feature spec (a categorical feature without its vocabulary) is
  first completed by a federated statistics study across the silos
  (`run_statistics_study`): each silo then preprocesses with the shared spec.

  Returns:
    Silo name -> its client-data directory.
  """
  names = [f'silo-{chr(ord("a") + i)}' for i in range(num_silos)]
  raw_dirs = [os.path.join(work_dir, 'raw', n) for n in names]
  spec = feature_spec_lib.FeatureSpec.load(config.data.feature_spec)
  silo_partition.partition_raw_csv(
    train_file=config.data.train_files,
    eval_file=config.data.eval_files,
    feature_spec_file=config.data.feature_spec,
    client_key=spec.client_key,
    silo_dirs=raw_dirs,
  )
  spec_files = {n: os.path.join(d, 'feature_spec.json') for n, d in zip(names, raw_dirs)}
  if spec.is_draft:
    shared = run_statistics_study(
      config, spec, {n: os.path.join(d, 'train.csv') for n, d in zip(names, raw_dirs)}, work_dir
    )
    spec_files = dict.fromkeys(names, shared)
  data_dirs = {}
  for name, raw_dir in zip(names, raw_dirs):
    data_dirs[name] = os.path.join(work_dir, 'data', name)
    # As each data owner would: their own run of the pipeline on their files.
    result = subprocess.run(
      [
        sys.executable,
        '-m',
        'fedpipe.cli.preprocess',
        f'--config={config_flags.get_config_filename(flags.FLAGS["config"])}',
        f'--config.data.train_files={raw_dir}/train.csv',
        f'--config.data.eval_files={raw_dir}/test.csv',
        f'--config.data.feature_spec={spec_files[name]}',
        f'--config.data.processed_dir={data_dirs[name]}',
        f'--config.data.min_examples_per_client={config.data.min_examples_per_client}',
        f'--config.data.max_malformed_fraction={config.data.max_malformed_fraction}',
      ],
      capture_output=True,
      text=True,
      check=False,
    )
    if result.returncode != 0:
      cli.fail(f'preprocessing for {name} failed: {result.stderr.strip().splitlines()[-1:]}')
    print(f'{name}: ' + result.stdout.strip().splitlines()[0])
  return data_dirs


def run_statistics_study(
  config, draft: feature_spec_lib.FeatureSpec, raw_files: dict[str, str], work_dir: str
) -> str:
  """Completes a draft spec with federated statistics; returns the shared spec's path.

  Starts one governed silo per raw file in statistics-only mode, submits the
  study, approves it as each data owner, has every silo release its noised
  statistics (charged to its ledger, which training later adds to), and
  writes the shared spec and the report under `<work_dir>/statistics`.
  """
  print('the feature spec is a draft: computing the shared spec with federated statistics')
  silos = local_federation.start_local_federation(
    dict.fromkeys(raw_files), work_dir, raw_data=raw_files
  )
  try:
    for name, process in silos.silos.items():
      print(f'{name}: serving statistics on {process.address}', flush=True)
    statistics = config.data.statistics
    settings = federated_statistics.StatisticsSettings(
      max_rows_per_user=statistics.max_rows_per_user,
      histogram_bins=statistics.histogram_bins,
      noise_multiplier=statistics.noise_multiplier,
    )
    addresses = cross_silo.parse_silos(silos.silos_flag)
    tls = silos.coordinator_tls()
    name = f'feature statistics of {config.name}'
    study_id = federated_statistics.submit(
      draft, addresses, tls, settings, name=name, progress=print
    )
    for silo in raw_files:
      _approve_as_data_owner(silos, silo, study_id)
    result = federated_statistics.compute_shared_spec(
      draft,
      addresses,
      tls,
      settings,
      os.path.join(work_dir, 'statistics'),
      name=name,
      progress=print,
    )
  except FedpipeError as e:
    cli.fail(str(e))
  finally:
    silos.stop()
  for line in federated_statistics.summary_lines(result):
    print(line, flush=True)
  return result.spec_path


def start_local_silos(data_dirs: dict[str, str], work_dir: str) -> local_federation.LocalFederation:
  """Makes certificates and starts one governed silo process per data directory, side by side."""
  federation = local_federation.start_local_federation(data_dirs, work_dir)
  for name, process in federation.silos.items():
    print(f'{name}: serving on {process.address} (log {federation.log_path(name)})')
  return federation


def _approve_as_data_owner(
  federation: local_federation.LocalFederation, silo: str, study_id: str
) -> None:
  """What each silo's owner does after reviewing the study with `show`."""
  command = [
    sys.executable,
    '-m',
    'fedpipe.cli.governance',
    f'--state_dir={federation.state_dir(silo)}',
    f'--policy={federation.policy_path(silo)}',
    'approve',
    study_id,
  ]
  print(f'{silo} data owner: fedpipe-governance {" ".join(command[3:])}', flush=True)
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  print('  ' + (result.stdout or result.stderr).strip(), flush=True)
  if result.returncode and 'is already approved' not in result.stderr:  # A rerun of the demo.
    cli.fail(f'{silo} did not approve the study')


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    cli.fail(f'unexpected argument(s) {" ".join(argv[1:])}')
  training_program.quiet_logs()
  training_program.print_messages()
  config = cli.load_config(_CONFIG)
  if config.data.raw_format != 'csv':
    cli.fail('the cross-silo demo splits CSV raw data; set data.raw_format=csv')
  work_dir = os.path.abspath(_WORK_DIR.value or os.path.join('runs', f'{config.name}-silos'))
  os.makedirs(work_dir, exist_ok=True)
  data_dirs = prepare_silo_data(config, work_dir, _NUM_SILOS.value)
  silos = start_local_silos(data_dirs, work_dir)
  try:
    tls = silos.coordinator_tls()
    config.runtime.mode = 'silos'
    config.runtime.silos = silos.silos_flag
    config.runtime.tls_ca, config.runtime.tls_cert, config.runtime.tls_key = (
      tls.ca,
      tls.cert,
      tls.key,
    )
    run_dir = os.path.join(work_dir, 'run')
    with shutdown.graceful_termination():
      study_id = training_program.submit_study(config, run_dir)
      print(f'study_id={study_id}', flush=True)
      for name in data_dirs:
        _approve_as_data_owner(silos, name, study_id)
      result = federated_training.train(
        None, None, config=config, output_dir=run_dir, progress=federated_training.print_progress
      )
      print(result.summary(), flush=True)
  except FedpipeError as e:
    cli.fail(str(e))
  finally:
    silos.stop()
  return 0


def run() -> None:
  """Console-script entrypoint."""
  app.run(
    lambda argv: sys.exit(main(argv)),
    flags_parser=lambda argv: cli.parse_flags(argv, known_only=False),
  )


if __name__ == '__main__':
  run()
