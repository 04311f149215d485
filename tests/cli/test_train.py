"""The training program end to end: real Beam output, a real isolated worker, real files."""

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from fedpipe.computations import privacy_accounting
from fedpipe.data import manifest as manifest_lib
from tests.conftest import DIGITS_NUM_CLIENTS, REPO_ROOT, default_sigint, tff_worker_pids

pytestmark = pytest.mark.slow

NUM_CLIENTS = DIGITS_NUM_CLIENTS
CLIENTS_PER_ROUND = 10


@pytest.fixture(scope='module')
def client_data(digits_client_data):
  """Digits over 30 clients, preprocessed by the real Beam pipeline (the session's: the
  tests that change it change a copy)."""
  return digits_client_data.processed


def _command(processed, output_dir, *extra):
  return [
    sys.executable,
    '-m',
    'fedpipe.cli.train',
    '--config=configs/digits_dp.py',
    f'--config.data.processed_dir={processed}',
    f'--config.training.clients_per_round={CLIENTS_PER_ROUND}',
    f'--output_dir={output_dir}',
    *extra,
  ]


def _run(args, timeout=600):
  return subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


# TensorFlow's C++ logging (cuDNN registration, grappler), printed at import or
# graph optimization whatever the program does.
_TF_LOG_LINE = re.compile(r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] ')


def _own_lines(stderr):
  """The lines of stderr the program itself wrote."""
  return [ln for ln in stderr.splitlines() if not _TF_LOG_LINE.match(ln)]


def _assert_one_line_error(result, *fragments):
  assert result.returncode == 2, result.stderr[-3000:]
  lines = _own_lines(result.stderr)
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0]
  return lines[0]


def _start(command):
  """Starts a training run; returns it once it printed its first round."""
  process = subprocess.Popen(
    command,
    cwd=REPO_ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    preexec_fn=default_sigint,
  )
  for line in process.stdout:
    if line.startswith('round '):
      return process
  process.wait()
  pytest.fail(f'training ended before its first round: {process.stderr.read()[-3000:]}')


def _no_new_workers(before, timeout=15.0):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if not tff_worker_pids() - before:
      return True
    time.sleep(0.2)
  return False


def _processes_of(pid):
  """Live processes that the training program `pid` started: its relay and worker."""
  table = {}
  for entry in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{entry}/cmdline', 'rb') as f:
        args = f.read().replace(b'\0', b' ').decode(errors='replace')
      with open(f'/proc/{entry}/stat') as f:
        parent = int(f.read().rsplit(')', 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
      continue  # Not a process, or it ended meanwhile.
    table[int(entry)] = (parent, args)
  relays = {p for p, (_, args) in table.items() if f'fedpipe-worker-{pid}-' in args}
  return relays | {p for p, (parent, _) in table.items() if parent in relays}


def _all_ended(pid, timeout=15.0):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if not _processes_of(pid):
      return True
    time.sleep(0.2)
  return False


def _tree_digest(path):
  digest = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(root, name)
      digest.update(full.encode())
      with open(full, 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()


def _metric_rounds(output_dir):
  with open(os.path.join(output_dir, 'metrics.csv'), newline='') as f:
    return [int(row['key']) for row in csv.DictReader(f)]


def test_trains_and_writes_report_metrics_model_and_plot(client_data, tmp_path):
  before = tff_worker_pids()
  out = tmp_path / 'run'
  result = _run(_command(client_data, out, '--config.training.rounds=3'))
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert [ln.split('=')[0] for ln in lines[-4:]] == [
    'test_accuracy',
    'epsilon',
    'delta',
    'output_dir',
  ]
  assert lines[-1] == f'output_dir={out}'
  assert sum(ln.startswith('round ') for ln in lines) == 3

  report = json.loads((out / 'privacy_report.json').read_text())
  for key in (
    'epsilon',
    'delta',
    'noise_multiplier',
    'clients_per_round',
    'population_size',
    'rounds',
    'sampling',
    'accountant',
    'test_accuracy',
  ):
    assert key in report
  assert report['population_size'] == NUM_CLIENTS
  assert report['rounds'] == 3
  # The demo config's accountant.
  assert (report['sampling'], report['accountant']) == ('poisson', 'pld')
  expected = privacy_accounting.compute_epsilon(
    noise_multiplier=report['noise_multiplier'],
    sampling=privacy_accounting.SamplingScheme('poisson', NUM_CLIENTS, CLIENTS_PER_ROUND),
    rounds=3,
    delta=report['delta'],
    accountant='pld',
  )
  assert report['epsilon'] == pytest.approx(expected, rel=1e-9)
  assert float(lines[-3].split('=')[1]) == pytest.approx(expected, abs=1e-4)
  assert float(lines[-4].split('=')[1]) == pytest.approx(report['test_accuracy'], abs=1e-4)
  assert 'epsilon' in (out / 'privacy_report.txt').read_text()

  assert _metric_rounds(out) == [1, 2, 3]
  assert (out / 'training_curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert any(
    name.startswith('events.out.tfevents')
    for _, _, files in os.walk(out / 'tensorboard')
    for name in files
  )
  assert oct((out / 'sampling_seed').stat().st_mode & 0o777) == '0o600'

  import numpy as np
  import tensorflow as tf

  model = tf.keras.models.load_model(out / 'model.keras')
  assert model.predict(np.zeros((2, 64), np.float32), verbose=0).shape == (2, 10)
  assert _no_new_workers(before)

  # The same command again: the run is complete, its results stand, and
  # nothing is evaluated (released) again.
  again = _run(_command(client_data, out, '--config.training.rounds=3'))
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'is complete (3 rounds); its results stand' in again.stdout
  assert again.stdout.strip().splitlines()[-4:] == lines[-4:]
  assert 'worker.log' not in again.stdout and _metric_rounds(out) == [1, 2, 3]


@pytest.mark.parametrize(
  'extra,expected',
  [
    (['--no_such_flag=1'], 'no_such_flag'),
    (['--config.training.roudns=3'], 'roudns'),
    (['--config.training.sampling=random'], 'config.training.sampling'),
    (
      ['--config.dp.target_epsilon=3.0'],
      'exactly one of dp.noise_multiplier and dp.target_epsilon',
    ),
    ([f'--config.training.clients_per_round={NUM_CLIENTS + 1}'], 'clients_per_round'),
    # Found by the aggregator, not by config validation: once a traceback.
    (['--config.dp.clipping=adaptive'], 'increase `clipped_count_stddev`'),
  ],
)
def test_bad_flags_and_config_fail_clearly_and_write_nothing(
  client_data, tmp_path, extra, expected
):
  out = tmp_path / 'run'
  result = _run(_command(client_data, out, *extra))
  assert result.returncode == 2
  assert expected in result.stderr
  assert 'Traceback' not in result.stderr
  if 'clients_per_round' not in expected:
    assert not out.exists()


def test_missing_client_data_names_the_directory_and_the_fix(tmp_path):
  result = _run(_command(str(tmp_path / 'nowhere'), tmp_path / 'run'))
  assert result.returncode == 2
  assert 'nowhere' in result.stderr and 'fedpipe-preprocess' in result.stderr


def test_a_client_without_examples_is_named(client_data, tmp_path):
  processed = tmp_path / 'clients'
  subprocess.run(['cp', '-r', client_data, str(processed)], check=True)
  manifest = json.loads((processed / 'manifest.json').read_text())
  first = sorted(manifest['splits']['train']['clients'])[0]
  manifest['splits']['train']['clients'][first] = 0
  (processed / 'manifest.json').write_text(json.dumps(manifest))
  result = _run(_command(str(processed), tmp_path / 'run'))
  assert result.returncode == 2
  assert first in result.stderr and 'no examples' in result.stderr


def test_an_unreadable_client_file_fails_the_round_naming_the_client_and_keeps_checkpoints(
  client_data, tmp_path
):
  processed = tmp_path / 'clients'
  subprocess.run(['cp', '-r', client_data, str(processed)], check=True)
  out = tmp_path / 'run'
  command = _command(str(processed), out, '--config.training.rounds=2')
  first = _run(command)
  assert first.returncode == 0, first.stderr[-2000:]
  manifest = manifest_lib.read_manifest(str(processed))
  assert manifest.storage == manifest_lib.STORAGE_SQLITE
  (processed / manifest_lib.STORE_FILENAME).write_bytes(b'not a database ' * 100)
  digest = _tree_digest(out / 'checkpoints')
  result = _run([c.replace('rounds=2', 'rounds=3') for c in command])
  assert result.returncode == 2
  assert 'round 3 failed' in result.stderr
  # SQLite's error quotes the query, which names the clients read.
  assert 'file is not a database' in result.stderr
  assert any(f"'{client}'" in result.stderr for client in manifest.split('train').clients)
  assert _tree_digest(out / 'checkpoints') == digest


def test_resuming_with_a_different_config_is_refused_and_the_run_is_untouched(
  client_data, tmp_path
):
  out = tmp_path / 'run'
  first = _run(_command(client_data, out, '--config.training.rounds=1'))
  assert first.returncode == 0, first.stderr[-2000:]
  digest = _tree_digest(out)
  result = _run(
    _command(client_data, out, '--config.training.rounds=2', '--config.dp.noise_multiplier=3.0')
  )
  assert result.returncode == 2
  assert 'config.dp.noise_multiplier: 1.76 -> 3.0' in result.stderr
  assert '--overwrite' in result.stderr
  assert _tree_digest(out) == digest


def test_a_second_run_is_refused_at_once_then_after_kill_9_the_same_run_resumes(
  client_data, tmp_path
):
  out = tmp_path / 'run'
  first = _start(_command(client_data, out, '--config.training.rounds=500'))
  try:
    assert _processes_of(first.pid)
    assert (out / '.lock').read_text() == f'{first.pid}\n'
    second = _run(_command(client_data, out, '--config.training.rounds=500'))
    assert first.poll() is None, 'the first run ended before the second was refused'
    _assert_one_line_error(
      second, f'{out} is in use by another run (pid {first.pid})', '--output_dir'
    )
  finally:
    first.kill()
    first.communicate(timeout=30)
  assert _all_ended(first.pid), 'a worker outlived kill -9 of its training program'
  done = len(_metric_rounds(out))
  assert done >= 1

  before = tff_worker_pids()
  rerun = _run(_command(client_data, out, f'--config.training.rounds={done + 1}'))
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  # kill -9 can land between a round's metrics and its checkpoint: the rerun
  # resumes from the last checkpoint and redoes what followed it.
  assert 'resuming from the checkpoint of round' in rerun.stdout
  assert _metric_rounds(out) == list(range(1, done + 2))
  assert json.loads((out / 'privacy_report.json').read_text())['rounds'] == done + 1
  assert (out / '.lock').read_text() == ''
  assert _no_new_workers(before), 'a worker outlived the resumed run'


@pytest.mark.parametrize('sig,status', [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_says_after_which_round_and_a_rerun_resumes(
  client_data, tmp_path, sig, status
):
  out = tmp_path / 'run'
  process = _start(_command(client_data, out, '--config.training.rounds=500'))
  try:
    assert _processes_of(process.pid)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=60)
  finally:
    if process.poll() is None:
      process.kill()
      process.communicate()
  assert process.returncode == status, stderr[-3000:]
  assert 'Traceback' not in stderr + stdout
  lines = _own_lines(stderr)
  assert len(lines) == 1, stderr[-3000:]
  match = re.fullmatch(r'interrupted after round (\d+); rerun the same command to resume', lines[0])
  assert match, lines[0]
  rounds = int(match.group(1))
  assert rounds >= 1 and _metric_rounds(out) == list(range(1, rounds + 1))
  assert _all_ended(process.pid), 'a worker outlived the interrupted run'
  if sig != signal.SIGINT:
    return  # Resuming is the same for every way a run ends (see the kill -9 test).
  rerun = _run(_command(client_data, out, f'--config.training.rounds={rounds + 1}'))
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f'resuming from the checkpoint of round {rounds}' in rerun.stdout


def test_an_output_dir_that_is_a_file_is_one_line(client_data, tmp_path):
  a_file = tmp_path / 'notes.txt'
  a_file.write_text('precious')
  result = _run(_command(client_data, a_file))
  _assert_one_line_error(result, f'{a_file} is a file, not a directory', '--output_dir')
  result = _run(_command(client_data, a_file / 'run'))
  _assert_one_line_error(result, f'cannot create the run directory {a_file}/run')
  assert a_file.read_text() == 'precious'


def test_an_output_dir_that_cannot_be_created_is_one_line(client_data):
  # Tests run as root, for whom permission bits do not stop writes; /sys refuses new entries.
  result = _run(_command(client_data, '/sys/fedpipe-run'))
  _assert_one_line_error(
    result, 'cannot create the run directory /sys/fedpipe-run', 'a directory you can write to'
  )


def test_a_missing_config_file_is_one_line_with_nothing_at_exit(tmp_path):
  result = _run(
    [
      sys.executable,
      '-m',
      'fedpipe.cli.train',
      '--config=configs/nope.py',
      f'--output_dir={tmp_path / "run"}',
    ]
  )
  _assert_one_line_error(result, '--config=configs/nope.py: no such file')
  assert 'Exception ignored' not in result.stderr and '__del__' not in result.stderr
  assert not (tmp_path / 'run').exists()


def test_fedprox_with_fedadam_trains(client_data, tmp_path):
  """FedProx's client update (`proximal_optimizer`) with Adam on the server."""
  result = _run(
    _command(
      client_data,
      tmp_path / 'run',
      '--config.training.rounds=2',
      '--config.training.proximal_strength=0.1',
      '--config.training.server_optimizer=adam',
      '--config.training.server_learning_rate=0.05',
    )
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert _metric_rounds(tmp_path / 'run') == [1, 2]
