"""Tests of the make_data and preprocess programs, run as a user runs them."""

import json
import os
import subprocess
import sys

import pytest

from fedpipe.data import manifest
from tests.conftest import REPO_ROOT

# Each test runs the programs as subprocesses.
pytestmark = pytest.mark.slow

CONFIG = 'configs/digits_dp.py'


def _program(module, *args, timeout=300):
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'}
  return subprocess.run(
    [sys.executable, '-m', module, *args],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


def _data_flags(tmp_path, *, raw_format='csv'):
  raw = tmp_path / 'raw'
  return [
    f'--config.data.raw_dir={raw}',
    f'--config.data.raw_format={raw_format}',
    f'--config.data.train_files={raw}/train.{raw_format}',
    f'--config.data.eval_files={raw}/test.{raw_format}',
    f'--config.data.feature_spec={raw}/feature_spec.json',
    f'--config.data.processed_dir={tmp_path}/clients',
  ]


def _assert_one_line_error(result, *fragments):
  assert result.returncode == 2, result.stderr
  assert 'Traceback' not in result.stderr, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, result.stderr
  for fragment in fragments:
    assert fragment in errors[0], errors[0]


def test_make_data_then_preprocess(tmp_path):
  flags = [f'--config={CONFIG}', *_data_flags(tmp_path), '--config.data.num_clients=25']
  made = _program('fedpipe.cli.make_data', *flags)
  assert made.returncode == 0, made.stderr
  assert 'over 25 clients' in made.stdout and 'note:' not in made.stdout
  again = _program('fedpipe.cli.make_data', *flags)
  assert again.returncode == 0 and 'nothing to do' in again.stdout
  # A data owner's extra column: read, ignored, and said so.
  train_csv = tmp_path / 'raw' / 'train.csv'
  lines = train_csv.read_text().splitlines()
  train_csv.write_text(
    '\n'.join([lines[0] + ',comment'] + [ln + ',n/a' for ln in lines[1:]]) + '\n'
  )

  # A Beam option passes through to PipelineOptions.
  result = _program('fedpipe.cli.preprocess', *flags, '--direct_running_mode=in_memory')
  assert result.returncode == 0, result.stderr
  assert 'Preprocessed 1797 rows' in result.stdout
  assert 'train: 1438 rows read, 1438 valid, 0 malformed; 25 clients written' in result.stdout
  assert 'rows/s' in result.stdout
  assert "columns not in the feature spec, ignored: 'comment' (train: 1438 rows)" in result.stdout
  m = manifest.read_manifest(str(tmp_path / 'clients'))
  assert len(m.split('train').clients) == 25 and m.num_features == 64
  assert m.extra['preprocessing']['ignored_columns'] == {'train': {'comment': 1438}, 'eval': {}}


def test_breast_cancer_jsonl_by_config_only(tmp_path):
  flags = [
    f'--config={CONFIG}',
    *_data_flags(tmp_path, raw_format='jsonl'),
    '--config.data.source=sklearn:breast_cancer',
    '--config.data.num_clients=40',
    '--config.data.partition=dirichlet',
    '--config.data.dirichlet_alpha=0.3',
  ]
  made = _program('fedpipe.cli.make_data', *flags)
  assert made.returncode == 0, made.stderr
  result = _program('fedpipe.cli.preprocess', *flags)
  assert result.returncode == 0, result.stderr
  m = manifest.read_manifest(str(tmp_path / 'clients'))
  assert (m.num_features, m.num_classes) == (30, 2)
  assert len(m.split('train').clients) == 40
  with open(tmp_path / 'raw' / 'generation.json') as f:
    assert json.load(f)['params']['partition'] == 'dirichlet'


def test_unknown_flag_is_named():
  result = _program(
    'fedpipe.cli.preprocess', f'--config={CONFIG}', '--confg=x', '--runner=DirectRunner'
  )
  _assert_one_line_error(result, '--confg=x', 'neither a flag of this program')
  assert '--runner' not in result.stderr


def test_unknown_config_field_is_named():
  result = _program('fedpipe.cli.preprocess', '--config.data.nmu_clients=3')
  _assert_one_line_error(result, '--config.data.nmu_clients', 'nmu_clients', 'num_clients')


def test_bad_config_value_and_file():
  result = _program('fedpipe.cli.make_data', '--config.data.num_clients=many')
  _assert_one_line_error(result, '--config.data.num_clients=many')
  result = _program('fedpipe.cli.make_data', '--config=configs/nope.py')
  _assert_one_line_error(result, 'configs/nope.py')
  result = _program('fedpipe.cli.make_data', '--overwrit')
  _assert_one_line_error(result, '--overwrit')


@pytest.mark.parametrize('module', ['fedpipe.cli.preprocess', 'fedpipe.cli.make_data'])
def test_missing_config_file_is_the_only_line_on_stderr(module):
  result = _program(module, '--config=configs/nope.py')
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
    'error: --config=configs/nope.py: no such file; give an experiment config file '
    '(e.g. --config=configs/digits_dp.py).'
  ]


def test_missing_input_exits_2_with_one_line(tmp_path):
  result = _program('fedpipe.cli.preprocess', f'--config={CONFIG}', *_data_flags(tmp_path))
  _assert_one_line_error(
    result, 'feature spec', str(tmp_path / 'raw' / 'feature_spec.json'), 'fedpipe-make-data'
  )
  (tmp_path / 'spec.json').write_text(
    json.dumps(
      {
        'schema_version': 1,
        'client_key': 'client_id',
        'label': {'name': 'label', 'num_classes': 2},
        'features': [{'name': 'a'}],
      }
    )
  )
  result = _program(
    'fedpipe.cli.preprocess',
    f'--config={CONFIG}',
    *_data_flags(tmp_path),
    f'--config.data.feature_spec={tmp_path}/spec.json',
  )
  _assert_one_line_error(result, 'no file matches data.train_files=', str(tmp_path / 'raw'))


def test_make_data_with_no_source(tmp_path):
  result = _program(
    'fedpipe.cli.make_data', '--config.data.source=none', f'--config.data.raw_dir={tmp_path}/raw'
  )
  assert result.returncode == 0, result.stderr
  assert 'nothing to generate' in result.stdout
  assert not (tmp_path / 'raw').exists()
