"""A run directory: one run at a time, resuming only its own run, with a secret seed."""

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from fedpipe.config import base
from fedpipe.training import run_directory
from tests.conftest import REPO_ROOT


def _config(**dp):
  config = base.get_base_config()
  config.dp.noise_multiplier = dp.get('noise_multiplier', 1.0)
  return config


def test_same_config_resumes_and_rounds_may_grow(tmp_path):
  run_directory.prepare(str(tmp_path / 'run'), _config())
  config = _config()
  config.training.rounds = 500
  config.runtime.allow_exposed_worker = True
  run_directory.prepare(str(tmp_path / 'run'), config)


def test_a_different_mechanism_is_refused_naming_the_field(tmp_path):
  run_directory.prepare(str(tmp_path / 'run'), _config())
  with pytest.raises(
    run_directory.RunDirectoryError, match=r'config.dp.noise_multiplier: 1.0 -> 2.0.*--overwrite'
  ):
    run_directory.prepare(str(tmp_path / 'run'), _config(noise_multiplier=2.0))
  run_directory.prepare(str(tmp_path / 'run'), _config(noise_multiplier=2.0), overwrite=True)


def test_refuses_to_use_or_delete_a_foreign_directory(tmp_path):
  foreign = tmp_path / 'home'
  foreign.mkdir()
  (foreign / 'thesis.tex').write_text('precious')
  for overwrite in (False, True):
    with pytest.raises(run_directory.RunDirectoryError, match='not a fedpipe run directory'):
      run_directory.prepare(str(foreign), _config(), overwrite=overwrite)
  assert (foreign / 'thesis.tex').read_text() == 'precious'


def test_sampling_seed_is_random_secret_and_stable(tmp_path):
  run = run_directory.prepare(str(tmp_path / 'run'), _config())
  seed, secret = run_directory.sampling_seed(run, None)
  assert secret
  assert run_directory.sampling_seed(run, None) == (seed, True)
  mode = os.stat(os.path.join(run.root, run_directory.SAMPLING_SEED)).st_mode
  assert stat.S_IMODE(mode) == 0o600
  other = run_directory.prepare(str(tmp_path / 'other'), _config())
  assert run_directory.sampling_seed(other, None)[0] != seed
  assert run_directory.sampling_seed(other, 7) == (7, False)


_HOLDER = """
import sys, time
from fedpipe.training import run_directory
with run_directory.lock(sys.argv[1]):
  print('locked', flush=True)
  time.sleep(600)
"""


def _hold_lock(path):
  """A process holding the lock of `path`, started and locked on return."""
  holder = subprocess.Popen(
    [sys.executable, '-c', _HOLDER, str(path)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
  )
  assert holder.stdout.readline() == 'locked\n'
  return holder


def test_a_second_process_is_refused_naming_the_holder_until_it_dies(tmp_path):
  run = tmp_path / 'run'
  holder = _hold_lock(run)
  try:
    assert (run / run_directory.LOCK_FILE).read_text() == f'{holder.pid}\n'
    started = time.monotonic()
    with pytest.raises(
      run_directory.RunDirectoryInUseError,
      match=rf'{run} is in use by another run \(pid {holder.pid}\)',
    ):
      with run_directory.lock(str(run)):
        pass
    assert time.monotonic() - started < 1.0
  finally:
    holder.kill()  # SIGKILL: the kernel releases the lock, nothing unwinds.
    holder.wait()
    holder.stdout.close()
  with run_directory.lock(str(run)) as root:
    assert root == str(run)
    assert (run / run_directory.LOCK_FILE).read_text() == f'{os.getpid()}\n'
  assert (run / run_directory.LOCK_FILE).read_text() == ''


def test_the_lock_is_taken_before_the_run_and_survives_overwrite(tmp_path):
  run = tmp_path / 'run'
  with run_directory.lock(str(run)):
    run_directory.prepare(str(run), _config())  # Only the lock file in it: a new run.
    (run / 'metrics.csv').write_text('key\n1\n')
    run_directory.prepare(str(run), _config(noise_multiplier=2.0), overwrite=True)
    assert sorted(os.listdir(run)) == [run_directory.LOCK_FILE, run_directory.RUN_CONFIG]


def test_lock_refuses_a_file_a_path_under_a_file_and_a_foreign_directory(tmp_path):
  a_file = tmp_path / 'notes.txt'
  a_file.write_text('precious')
  with pytest.raises(
    run_directory.RunDirectoryError,
    match=rf'{a_file} is a file, not a directory; give --output_dir',
  ):
    with run_directory.lock(str(a_file)):
      pass
  with pytest.raises(
    run_directory.RunDirectoryError,
    match=rf'cannot create the run directory {a_file}/run: {a_file} is a file',
  ):
    with run_directory.lock(str(a_file / 'run')):
      pass
  foreign = tmp_path / 'home'
  foreign.mkdir()
  (foreign / 'thesis.tex').write_text('precious')
  with pytest.raises(run_directory.RunDirectoryError, match='not a fedpipe run directory'):
    with run_directory.lock(str(foreign)):
      pass
  assert os.listdir(foreign) == ['thesis.tex']
  assert a_file.read_text() == 'precious'


def test_lock_refuses_a_directory_it_cannot_create():
  # /sys refuses new entries even to root, for whom permission bits do not.
  with pytest.raises(
    run_directory.RunDirectoryError,
    match=r'cannot create the run directory /sys/fedpipe-run: .*writ',
  ):
    with run_directory.lock('/sys/fedpipe-run'):
      pass


def test_a_run_written_before_model_builders_existed_resumes(tmp_path):
  run = run_directory.prepare(str(tmp_path / 'run'), _config())
  path = os.path.join(run.root, run_directory.RUN_CONFIG)
  with open(path) as f:
    written = json.load(f)
  del written['model']['builder']
  with open(path, 'w') as f:
    json.dump(written, f)
  run_directory.prepare(str(tmp_path / 'run'), _config())
  config = _config()
  config.model.builder = 'fedpipe.computations.keras_model:build_mlp'
  with pytest.raises(run_directory.RunDirectoryError, match='config.model.builder'):
    run_directory.prepare(str(tmp_path / 'run'), config)


def test_the_model_is_recorded_and_another_model_is_refused(tmp_path):
  run = run_directory.prepare(str(tmp_path / 'run'), _config())
  assert run_directory.read_model_record(run) is None
  run_directory.check_model(run, architecture='mlp-64', num_features=64, num_classes=10)
  run_directory.check_model(run, architecture='mlp-64', num_features=64, num_classes=10)
  assert run_directory.read_model_record(run)['architecture'] == 'mlp-64'
  with pytest.raises(run_directory.RunDirectoryError, match=r'different model \(architecture'):
    run_directory.check_model(run, architecture='cnn', num_features=64, num_classes=10)


def test_last_checkpoint_and_metrics_are_read_from_the_files(tmp_path):
  run = run_directory.prepare(str(tmp_path / 'run'), _config())
  assert run.last_checkpoint() == 0 and not run.has_checkpoints() and run.read_metrics() == []
  os.makedirs(run.checkpoints)
  for name in ('program_state_2', 'program_state_12', 'program_state_13_temp', 'other'):
    os.makedirs(os.path.join(run.checkpoints, name))
  assert run.last_checkpoint() == 12 and run.has_checkpoints()
  with open(run.metrics_csv, 'w') as f:
    f.write('key,train_loss,eval_accuracy\n2,0.5,0.75\n1,0.75,\n')
  assert run.read_metrics() == [
    {'round': 1, 'train_loss': 0.75},
    {'round': 2, 'train_loss': 0.5, 'eval_accuracy': 0.75},
  ]
