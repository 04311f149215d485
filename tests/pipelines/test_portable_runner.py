"""Preprocessing through Beam's portable job API, the runner it refuses, and the runner docs.

The portable test starts Beam's Python job service (`local_job_service_main`)
and an external SDK worker pool (`worker_pool_main`, what Flink and Spark
clusters run next to each task manager or executor) as separate processes on
loopback, submits the preprocessing pipeline to them with
`--runner=PortableRunner --environment_type=EXTERNAL`, and requires its output
directory to be byte-identical to the default local runner's, whatever files
that directory holds. docs/beam_runners.md gives the options for real clusters;
the last test checks that every option it shows is one Beam 2.77 and
fedpipe-preprocess accept. The silo's federated statistics pipeline is
submitted to the same services and must give the local runner's exact
statistics.
"""

import dataclasses
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from fedpipe.cli import entrypoint as cli
from fedpipe.config import base as config_base
from fedpipe.pipelines import feature_spec as fs
from fedpipe.pipelines import feature_statistics
from fedpipe.pipelines import pipeline as pp
from fedpipe.statistics import query as statistics_query
from tests.conftest import REPO_ROOT

SPEC = fs.FeatureSpec(
  client_key='client_id',
  label=fs.LabelSpec(name='label', num_classes=3),
  features=(
    fs.FeatureColumn('a', min=0.0, max=10.0),
    fs.FeatureColumn('b', mean=5.0, std=2.0),
    fs.FeatureColumn('c'),
  ),
)
HEADER = 'client_id,label,a,b,c\n'
DOCS = os.path.join(REPO_ROOT, 'docs', 'beam_runners.md')
# Seconds a service may take to start listening (it imports Beam: a few seconds).
_START_TIMEOUT = 120


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _tail(path, lines=30):
  with open(path, errors='replace') as f:
    return ''.join(f.readlines()[-lines:])


def _start_service(module, port_flag, log_path):
  """Starts `python -m module port_flag=<free port>`; returns (process, port)."""
  port = _free_port()
  # The worker pool starts each SDK worker as `python ...` from PATH: the venv's first.
  env = {
    **os.environ,
    'PATH': os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', ''),
  }
  with open(log_path, 'wb') as log:
    process = subprocess.Popen(
      [sys.executable, '-m', module, f'{port_flag}={port}'],
      stdout=log,
      stderr=subprocess.STDOUT,
      stdin=subprocess.DEVNULL,
      env=env,
      start_new_session=True,  # Its own process group: the workers it starts die with it.
    )
  return process, port


def _wait_listening(process, port, log_path):
  deadline = time.monotonic() + _START_TIMEOUT
  while True:
    if process.poll() is not None:
      pytest.fail(
        f'{process.args[2]} exited with status {process.returncode} before listening on '
        f'port {port}; its log:\n{_tail(log_path)}'
      )
    try:
      socket.create_connection(('localhost', port), timeout=1).close()
      return
    except OSError:
      if time.monotonic() > deadline:
        pytest.fail(
          f'{process.args[2]} is not listening on port {port} after {_START_TIMEOUT} s; '
          f'its log:\n{_tail(log_path)}'
        )
      time.sleep(0.1)


def _stop(process):
  try:
    os.killpg(process.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  process.wait(timeout=30)


@pytest.fixture
def portable_services(tmp_path):
  """A job service and an external worker pool on loopback; the flags that submit to them."""
  logs = {'job_service': tmp_path / 'job_service.log', 'worker_pool': tmp_path / 'worker_pool.log'}
  started = []
  try:
    job_service, job_port = _start_service(
      'apache_beam.runners.portability.local_job_service_main', '--port', logs['job_service']
    )
    started.append(job_service)
    pool, pool_port = _start_service(
      'apache_beam.runners.worker.worker_pool_main', '--service_port', logs['worker_pool']
    )
    started.append(pool)
    _wait_listening(job_service, job_port, logs['job_service'])
    _wait_listening(pool, pool_port, logs['worker_pool'])
    flags = [
      '--runner=PortableRunner',
      f'--job_endpoint=localhost:{job_port}',
      '--environment_type=EXTERNAL',
      f'--environment_config=localhost:{pool_port}',
    ]
    yield flags, logs
  finally:
    for process in started:
      _stop(process)


def _write_inputs(directory):
  """Three training CSV files and one eval JSONL file; clients span files; some rows malformed."""
  directory.mkdir()
  train = [
    'u1,0,1,5,0\nu2,1,2,7,1\nu1,2,3,3,2\nu3,0,x,5,0\n',  # x: not_a_number
    'u2,2,4,6,1\nu4,1,5,5,0\n"key, with\nnewline",0,6,4,1\nu1,1,11,5,0\n',  # 11: out_of_range
    'u3,0,7,5,0\nu1,2,8,2,2\nu5,7,1,5,0\nu4,0,9,1,1\n',  # label 7: bad_label
  ]
  for i, rows in enumerate(train):
    (directory / f'train-{i}.csv').write_text(HEADER + rows)
  (directory / 'eval.jsonl').write_text(
    '{"client_id": "u1", "label": 1, "a": 1, "b": 5, "c": 0}\n'
    '{"client_id": "u2", "label": 0, "a": 2, "b": 6, "c": 1}\n'
    '{"client_id": "u2", "label": 1,\n'  # bad_json
    '{"client_id": "u3", "label": 2, "a": 3, "b": 4, "c": -1}\n'
  )
  return str(directory / 'train-*.csv'), str(directory / 'eval.jsonl')


def _preprocess(inputs, output_dir, flags=()):
  train_files, eval_files = inputs
  return pp.run_preprocessing(
    train_files=train_files,
    eval_files=eval_files,
    feature_spec=SPEC,
    output_dir=str(output_dir),
    min_examples_per_client=1,
    max_malformed_fraction=0.5,
    pipeline_options=PipelineOptions(list(flags)),
  )


def _tree(directory):
  """Relative path -> bytes, for every file under `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


def _tree_differences(expected, actual):
  """What differs between two `_tree`s, one line each (empty when byte-identical)."""
  lines = [f'only in the local output: {p}' for p in sorted(expected.keys() - actual.keys())]
  lines += [f'only in the portable output: {p}' for p in sorted(actual.keys() - expected.keys())]
  for path in sorted(expected.keys() & actual.keys()):
    a, b = expected[path], actual[path]
    if a != b:
      at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
      lines.append(
        f'{path}: {len(a)} bytes (local) vs {len(b)} bytes (portable), first difference at '
        f'byte {at}: {a[at : at + 60]!r} vs {b[at : at + 60]!r}'
      )
  return lines


def _summary_fields(summary):
  # The output directory and the wall time differ between the runs by design.
  fields = dataclasses.asdict(summary)
  del fields['output_dir'], fields['seconds']
  return fields


def test_portable_runner_with_external_worker_pool_writes_the_local_runners_bytes(
  portable_services, tmp_path
):
  flags, logs = portable_services
  inputs = _write_inputs(tmp_path / 'raw')
  portable = _preprocess(inputs, tmp_path / 'portable', flags)
  local = _preprocess(inputs, tmp_path / 'local')

  # The external environment was used: the pool started an SDK worker process.
  with open(logs['worker_pool'], errors='replace') as f:
    assert 'Starting worker with command' in f.read(), _tail(logs['worker_pool'])
  assert local.total_malformed == 4 and local.clients_written == {'train': 5, 'eval': 3}
  assert _summary_fields(portable) == _summary_fields(local)
  expected, actual = _tree(tmp_path / 'local'), _tree(tmp_path / 'portable')
  assert expected, 'the local run wrote no file'
  differences = _tree_differences(expected, actual)
  assert not differences, (
    'PortableRunner (EXTERNAL worker pool) and the local runner wrote different outputs:\n'
    + '\n'.join(differences)
  )

  # The statistics pipeline (what a silo runs for a statistics study), on the
  # same services: the same exact statistics as the local runner's.
  raw = tmp_path / 'raw-statistics.csv'
  raw.write_text(
    'client_id,label,a,b,region\n'
    + ''.join(f'u{i % 7},{i % 2},{i % 10},{(3 * i) % 11},{"nsew"[i % 4]}\n' for i in range(60))
    + 'u1,0,x,1,n\n'  # not_a_number: counted, kept at the silo.
  )
  query = statistics_query.StatisticsQuery(
    name='portable',
    feature_spec={
      'schema_version': 2,
      'client_key': 'client_id',
      'label': {'name': 'label', 'task': 'binary'},
      'features': [
        {'name': 'a', 'min': 0.0, 'max': 10.0},
        {'name': 'b', 'min': 0.0, 'max': 10.0},
        {'name': 'region', 'type': 'categorical', 'max_values_per_user': 2},
      ],
    },
    histogram_bins={'a': 5, 'b': 4},
    max_rows_per_user=6,
    noise_multiplier=0.0,
    threshold_delta=1e-7,
  )
  local_statistics = feature_statistics.compute_silo_statistics(query, raw_data=str(raw))
  portable_statistics = feature_statistics.compute_silo_statistics(
    query, raw_data=str(raw), pipeline_options=PipelineOptions(flags)
  )
  assert local_statistics.malformed == {'not_a_number': 1}
  assert local_statistics.rows == 7 * 6  # Seven users, each capped at six rows.
  assert portable_statistics.to_json() == local_statistics.to_json()


@pytest.mark.parametrize(
  'runner',
  ['DaskRunner', 'daskrunner', 'apache_beam.runners.dask.dask_runner.DaskRunner', 'dask'],
)
def test_dask_runner_is_refused_before_anything_runs(runner, tmp_path):
  (tmp_path / 'train.csv').write_text(HEADER + 'u1,0,1,5,0\n')
  with pytest.raises(pp.PipelineOptionsError) as e:
    _preprocess((str(tmp_path / 'train.csv'), None), tmp_path / 'out', [f'--runner={runner}'])
  message = str(e.value)
  assert message.startswith(f'--runner={runner} is refused')
  for fragment in ('loses and duplicates data', 'PortableRunner', 'docs/beam_runners.md'):
    assert fragment in message
  assert '\n' not in message
  assert sorted(os.listdir(tmp_path)) == ['train.csv']  # No staging or output directory.
  # Other runners pass through untouched.
  for other in ('FlinkRunner', 'PortableRunner', 'DataflowRunner', 'SparkRunner'):
    options = pp.resolve_pipeline_options(PipelineOptions([f'--runner={other}']))
    assert options.get_all_options()['runner'] == other


def test_cli_refuses_dask_runner_with_one_line(tmp_path):
  (tmp_path / 'train.csv').write_text(HEADER + 'u1,0,1,5,0\n')
  SPEC.save(str(tmp_path / 'spec.json'))
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'fedpipe.cli.preprocess',
      '--config=configs/digits_dp.py',
      f'--config.data.train_files={tmp_path}/train.csv',
      '--config.data.eval_files=',
      f'--config.data.feature_spec={tmp_path}/spec.json',
      f'--config.data.processed_dir={tmp_path}/out',
      '--runner=DaskRunner',
    ],
    cwd=REPO_ROOT,
    env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'},
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 2, result.stderr
  assert 'Traceback' not in result.stderr, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, result.stderr
  assert errors[0].startswith('error: --runner=DaskRunner is refused'), errors[0]
  assert 'docs/beam_runners.md' in errors[0]
  assert not os.path.exists(tmp_path / 'out')


def _documented_commands():
  """The fedpipe-preprocess command lines of docs/beam_runners.md's shell blocks, as argv."""
  with open(DOCS, encoding='utf-8') as f:
    text = f.read()
  commands = []
  for block in re.findall(r'```sh\n(.*?)```', text, flags=re.S):
    for command in block.replace('\\\n', ' ').splitlines():
      argv = shlex.split(command, comments=True)
      if argv and os.path.basename(argv[0]) == 'fedpipe-preprocess':
        commands.append(argv)
  return commands


def test_documented_runner_options_are_accepted():
  commands = _documented_commands()
  runners = set()
  for argv in commands:
    config_flags = [a for a in argv[1:] if a.startswith('--config')]
    beam_flags = [a for a in argv[1:] if not a.startswith('--config')]
    assert not cli.unknown_beam_args(beam_flags), (argv, cli.unknown_beam_args(beam_flags))
    options = pp.resolve_pipeline_options(PipelineOptions(beam_flags))
    runners.add(options.get_all_options()['runner'])  # Parses every value (choices too).
    config = config_base.get_default_config()
    for flag in config_flags:
      name = flag.split('=', 1)[0]
      if name != '--config':
        section, field = name.removeprefix('--config.').split('.')
        assert field in config[section], f'{name} in docs/beam_runners.md is not a config field'
  assert {'PortableRunner', 'FlinkRunner', 'SparkRunner', 'DataflowRunner'} <= runners
