"""A run directory resumes only the run it holds, and keeps its sampling seed secret."""

import os
import stat

import pytest

from configs import base
from pipelines import run_directory


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
  with pytest.raises(run_directory.RunDirectoryError,
                     match=r'config.dp.noise_multiplier: 1.0 -> 2.0.*--overwrite'):
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
