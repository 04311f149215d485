"""Config validation names every bad field, and every shipped config is valid."""

import glob
import importlib
import os

import pytest

from fedpipe.config import base, validation
from tests.conftest import REPO_ROOT

EXPERIMENTS = sorted(
  os.path.basename(p)[:-3]
  for p in glob.glob(os.path.join(REPO_ROOT, 'configs', '*.py'))
  if os.path.basename(p) not in ('__init__.py', 'base.py', 'validation.py')
)


@pytest.mark.parametrize('name', EXPERIMENTS)
def test_every_shipped_config_is_valid(name):
  validation.validate(importlib.import_module(f'configs.{name}').get_config())


def test_all_problems_are_reported_at_once_with_field_names():
  config = base.get_base_config()
  config.dp.noise_multiplier = 1.0
  config.training.rounds = 0
  config.training.sampling = 'random'
  config.dp.delta = 2.0
  with pytest.raises(validation.ConfigError) as error:
    validation.validate(config)
  message = str(error.value)
  assert 'config.training.rounds: got 0; must be an integer >= 1' in message
  assert "config.training.sampling: got 'random'; must be one of poisson, fixed_size" in message
  assert 'config.dp.delta' in message
  assert len(error.value.problems) == 3


def test_dp_needs_exactly_one_of_noise_and_target_epsilon():
  config = base.get_base_config()
  with pytest.raises(validation.ConfigError, match='exactly one of'):
    validation.validate(config)
  config.dp.noise_multiplier = 1.0
  config.dp.target_epsilon = 3.0
  with pytest.raises(validation.ConfigError, match='exactly one of'):
    validation.validate(config)
  config.dp.noise_multiplier = None
  validation.validate(config)


def test_pld_with_fixed_size_sampling_is_refused_with_the_fix():
  config = base.get_base_config()
  config.dp.noise_multiplier = 1.0
  config.dp.accountant = 'pld'
  config.training.sampling = 'fixed_size'
  with pytest.raises(validation.ConfigError, match='use dp.accountant=rdp'):
    validation.validate(config)


def test_silo_mode_requires_silos_and_tls_files():
  config = base.get_base_config()
  config.dp.noise_multiplier = 1.0
  config.runtime.mode = 'silos'
  with pytest.raises(validation.ConfigError) as error:
    validation.validate(config)
  for field in ('runtime.silos', 'runtime.tls_ca', 'runtime.tls_cert', 'runtime.tls_key'):
    assert f'config.{field}' in str(error.value)


def test_secure_placement_names_each_setting_it_cannot_work_with():
  config = base.get_base_config()
  config.dp.noise_multiplier = 1.0
  config.dp.placement = 'secure'
  config.dp.clipping = 'adaptive'
  config.training.sampling = 'fixed_size'
  config.dp.max_colluding = -1
  with pytest.raises(validation.ConfigError) as error:
    validation.validate(config)
  message = str(error.value)
  for expected in (
    'config.dp.clipping: dp.placement=secure needs dp.clipping=fixed',
    'config.training.sampling: dp.placement=secure needs training.sampling=poisson',
    'config.dp.max_colluding',
  ):
    assert expected in message, message
  config = base.get_base_config()
  config.dp.noise_multiplier = 1.0
  config.dp.placement = 'nowhere'
  with pytest.raises(validation.ConfigError, match='config.dp.placement'):
    validation.validate(config)


def test_the_cohort_engine_takes_central_and_secure_placement_and_checks_its_memory_budget():
  config = base.get_base_config()
  config.dp.noise_multiplier = 1.0
  config.runtime.engine = 'cohort'
  validation.validate(config)  # Local DP-FedAvg: fine.
  config.runtime.mode = 'silos'
  config.runtime.silos, config.runtime.tls_ca = 'a:1', 'ca.pem'
  config.runtime.tls_cert, config.runtime.tls_key = 'c.pem', 'k.pem'
  validation.validate(config)  # Across silos with central noise: fine too.
  assert validation.cohort_engine_conflicts(config) == []
  config.dp.placement = 'secure'
  config.training.sampling = 'poisson'
  validation.validate(config)  # Secure noise placement: the cohort engine as well.
  assert validation.cohort_engine_conflicts(config) == []
  config.runtime.cohort_memory_mb = 0
  with pytest.raises(validation.ConfigError, match='config.runtime.cohort_memory_mb') as error:
    validation.validate(config)
  assert 'runtime.mode' not in str(error.value)
  config.runtime.cohort_memory_mb = 256
  config.runtime.engine = 'turbo'
  with pytest.raises(validation.ConfigError, match='config.runtime.engine'):
    validation.validate(config)
