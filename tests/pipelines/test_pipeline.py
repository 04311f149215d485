"""Tests of fedpipe.pipelines.pipeline: real Beam pipelines on the local runner."""

import csv
import glob
import gzip
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from apache_beam.options.pipeline_options import PipelineOptions

from fedpipe.data import client_ids, client_store, manifest
from fedpipe.data.client_data_writer import write_client_data
from fedpipe.datasets import bundled_data
from fedpipe.pipelines import feature_spec as fs
from fedpipe.pipelines import pipeline as pp

SMALL_SPEC = fs.FeatureSpec(
  client_key='client_id',
  label=fs.LabelSpec(name='label', num_classes=3),
  features=(
    fs.FeatureColumn('a', min=0.0, max=10.0),
    fs.FeatureColumn('b', mean=5.0, std=2.0),
    fs.FeatureColumn('c'),
  ),
)
HEADER = b'client_id,label,a,b,c\n'


def _run(train, eval_files=None, *, spec, output_dir, min_examples=1, max_malformed=0.0, flags=()):
  return pp.run_preprocessing(
    train_files=str(train),
    eval_files=None if eval_files is None else str(eval_files),
    feature_spec=spec,
    output_dir=str(output_dir),
    min_examples_per_client=min_examples,
    max_malformed_fraction=max_malformed,
    pipeline_options=PipelineOptions(list(flags)),
  )


def _read_records(output_dir, split, client_id, num_features):
  """A client's (x, y) examples in its clients.sqlite, in order, parsed by TensorFlow."""
  spec = {
    'x': tf.io.FixedLenFeature([num_features], tf.float32),
    'y': tf.io.FixedLenFeature([], tf.int64),
  }
  out = []
  path = os.path.join(output_dir, manifest.STORE_FILENAME)
  for record in client_store.read_client(path, split, client_id):
    example = tf.io.parse_single_example(record, spec)
    out.append((example['x'].numpy(), int(example['y'].numpy())))
  return out


def _stored_clients(output_dir):
  return client_store.client_counts(os.path.join(output_dir, manifest.STORE_FILENAME))


def _snapshot(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


def _dead_letters(directory, split):
  lines = []
  for path in sorted(glob.glob(os.path.join(directory, 'dead_letter', f'{split}-*.jsonl'))):
    with open(path) as f:
      lines.extend(json.loads(line) for line in f if line.strip())
  return lines


def _siblings(output_dir):
  parent, name = os.path.split(str(output_dir))
  return sorted(p for p in os.listdir(parent) if p.startswith(name))


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
  """Bundled digits raw data (12 IID clients) and one preprocessing of it."""
  base = tmp_path_factory.mktemp('digits')
  raw = bundled_data.write_bundled_dataset(
    source='sklearn:digits', raw_dir=str(base / 'raw'), num_clients=12, seed=0
  )
  spec = fs.FeatureSpec.load(raw.feature_spec_file)
  output_dir = base / 'clients'
  summary = _run(raw.train_file, raw.test_file, spec=spec, output_dir=output_dir)
  return raw, spec, output_dir, summary


def test_output_matches_manifest_and_raw_values(digits):
  raw, spec, output_dir, summary = digits
  m = manifest.read_manifest(str(output_dir))
  assert m.storage == manifest.STORAGE_SQLITE
  # One SQLite file holds every client: no per-client files, no shards left.
  assert sorted(os.listdir(output_dir)) == ['clients.sqlite', 'dead_letter', 'manifest.json']
  assert m.num_features == spec.num_features == 64
  assert m.num_classes == spec.num_classes == 10
  assert m.feature_spec == spec.to_json()
  assert m.dead_letter['total'] == 0
  for split, raw_file in (
    (manifest.TRAIN_SPLIT, raw.train_file),
    (manifest.EVAL_SPLIT, raw.test_file),
  ):
    with open(raw_file, newline='') as f:
      rows = list(csv.DictReader(f))
    expected = {}
    for row in rows:  # In file order, as the pipeline writes them.
      x = [float(row[c.name]) / 16.0 for c in spec.features]
      expected.setdefault(row['client_id'], []).append((x, int(row['label'])))
    clients = m.split(split).clients
    assert clients == {k: len(v) for k, v in expected.items()}
    assert _stored_clients(output_dir)[split] == clients
    for client_id, examples in expected.items():
      records = _read_records(output_dir, split, client_id, 64)
      assert [y for _, y in records] == [y for _, y in examples]
      np.testing.assert_allclose(
        np.stack([x for x, _ in records]), np.array([x for x, _ in examples], dtype=np.float32)
      )
    assert summary.rows_read[split] == len(rows) == summary.examples_written[split]
  assert summary.total_malformed == 0
  assert summary.clients_written == {'train': 12, 'eval': 12}
  assert _siblings(output_dir) == ['clients']  # No staging dir left behind.
  text = summary.format()
  assert '1797 rows' in text and 'train: 1438 rows read' in text and 'malformed rows: none' in text


def test_rerun_writes_identical_files(digits, tmp_path):
  raw, spec, output_dir, _ = digits
  _run(raw.train_file, raw.test_file, spec=spec, output_dir=tmp_path / 'again')
  # clients.sqlite included, byte for byte.
  assert _snapshot(tmp_path / 'again') == _snapshot(output_dir)
  assert 'clients.sqlite' in _snapshot(output_dir)


def test_malformed_rows_go_to_dead_letter_with_reasons(tmp_path):
  train = tmp_path / 'train.csv'
  train.write_bytes(
    HEADER  # line 1
    + b'u1,0,1,5,0\n'  # 2 valid
    b'u1,1,2,7,1\n'  # 3 valid
    b'"key, with\nnewline",2,3,3,2\n'  # 4-5 valid, quoted comma and newline
    b'u2,0,,5,0\n'  # 6 missing_value
    b'u2,0,x,5,0\n'  # 7 not_a_number
    b'u2,0,1,nan,0\n'  # 8 non_finite
    b'u2,0,11,5,0\n'  # 9 out_of_range
    b'u2,7,1,5,0\n'  # 10 bad_label
    b',0,1,5,0\n'  # 11 empty_client_key
    b'u2,0,1,5\n'  # 12 wrong_column_count
    b'\n'  # 13 blank: not a row
    b'u3,1,\xff\xfe,5,0\n'  # 14 bad_encoding
    b'u3,1,"' + b'9' * 200_000 + b'",5,0\n'  # 15 bad_csv (field too long)
    b'u3,2,4,6,1\n'
  )  # 16 valid
  output_dir = tmp_path / 'out'
  summary = _run(train, spec=SMALL_SPEC, output_dir=output_dir, max_malformed=1.0)

  expected_lines = {
    'missing_value': 6,
    'not_a_number': 7,
    'non_finite': 8,
    'out_of_range': 9,
    'bad_label': 10,
    'empty_client_key': 11,
    'wrong_column_count': 12,
    'bad_encoding': 14,
    'bad_csv': 15,
  }
  assert summary.malformed == {'train': {r: 1 for r in sorted(expected_lines)}}
  assert summary.rows_read == {'train': 13}
  assert summary.rows_valid == {'train': 4}
  assert summary.rows_read['train'] == summary.rows_valid['train'] + summary.total_malformed
  letters = _dead_letters(output_dir, 'train')
  assert {d['reason']: d['line_number'] for d in letters} == expected_lines
  assert all(d['file'] == str(train) for d in letters)
  by_reason = {d['reason']: d for d in letters}
  assert by_reason['not_a_number']['raw'] == 'u2,0,x,5,0'
  assert "a='x'" in by_reason['not_a_number']['detail']
  assert by_reason['bad_csv']['raw'].endswith('[truncated]')

  m = manifest.read_manifest(str(output_dir))
  assert m.dead_letter['by_reason'] == {r: 1 for r in sorted(expected_lines)}
  assert m.dead_letter['total'] == 9
  hashed = client_ids.client_id_for_key('key, with\nnewline')
  assert m.split('train').clients == {'u1': 2, 'u3': 1, hashed: 1}
  records = _read_records(output_dir, 'train', 'u1', 3)
  np.testing.assert_allclose(records[0][0], [0.1, 0.0, 0.0])
  np.testing.assert_allclose(records[1][0], [0.2, 1.0, 1.0])
  assert [y for _, y in records] == [0, 1]
  text = summary.format()
  assert 'bad_csv=1' in text and str(output_dir / 'dead_letter') in text


def test_jsonl_and_gzip_inputs(tmp_path):
  train = tmp_path / 'train.csv.gz'
  with gzip.open(train, 'wb') as f:
    f.write(HEADER + b'u1,0,1,5,0\nu2,1,2,5,0\n')
  eval_file = tmp_path / 'eval.jsonl'
  eval_file.write_text(
    '\n'.join(
      [
        '{"client_id": "u1", "label": 1, "a": 1, "b": 5, "c": 0}',  # 1 valid
        '{"client_id": "u1", "label": 1,',  # 2 bad_json
        '[1, 2]',  # 3 bad_json
        '{"client_id": "u1", "label": 1, "a": 1, "b": 5}',  # 4 missing_field
        '{"client_id": "u2", "label": 1, "a": true, "b": 5, "c": 0}',  # 5 not_a_number
        '',  # 6 blank
        '{"client_id": "u2", "label": "2", "a": "2", "b": "5", "c": "-1", "extra": [1]}',
      ]
    )
    + '\n'
  )
  output_dir = tmp_path / 'out'
  summary = _run(train, eval_file, spec=SMALL_SPEC, output_dir=output_dir, max_malformed=0.7)
  assert summary.rows_read == {'train': 2, 'eval': 6}
  assert summary.malformed == {
    'train': {},
    'eval': {'bad_json': 2, 'missing_field': 1, 'not_a_number': 1},
  }
  letters = _dead_letters(output_dir, 'eval')
  assert sorted((d['line_number'], d['reason']) for d in letters) == [
    (2, 'bad_json'),
    (3, 'bad_json'),
    (4, 'missing_field'),
    (5, 'not_a_number'),
  ]
  m = manifest.read_manifest(str(output_dir))
  assert m.split('train').clients == {'u1': 1, 'u2': 1}
  assert m.split('eval').clients == {'u1': 1, 'u2': 1}
  records = _read_records(output_dir, 'eval', 'u2', 3)
  np.testing.assert_allclose(records[0][0], [0.2, 0.0, -1.0])
  assert records[0][1] == 2
  assert summary.ignored_columns == {'train': {}, 'eval': {'extra': 1}}
  assert "columns not in the feature spec, ignored: 'extra' (eval: 1 row)" in summary.format()


def test_columns_not_in_the_spec_are_listed_with_their_row_counts(tmp_path):
  train = tmp_path / 'train.csv'
  train.write_bytes(
    b'client_id,notes,label,a,b,c,site\n'
    b'u1,hello,0,1,5,0,x\n'
    b'u1,,1,2,5,0,x\n'
    b'u2,bye,0,99,5,0,y\n'  # out_of_range: still had the columns
    b'u2,a,b,c\n'  # wrong_column_count: no columns read
    b'\n'
    b'u2,ok,1,3,5,0,y\n'
  )
  eval_file = tmp_path / 'eval.csv'
  eval_file.write_bytes(HEADER + b'u1,0,1,5,0\n')
  output_dir = tmp_path / 'out'
  summary = _run(train, eval_file, spec=SMALL_SPEC, output_dir=output_dir, max_malformed=0.5)
  assert summary.rows_read == {'train': 5, 'eval': 1}
  assert summary.malformed['train'] == {'out_of_range': 1, 'wrong_column_count': 1}
  assert summary.ignored_columns == {'train': {'notes': 4, 'site': 4}, 'eval': {}}
  assert (
    "columns not in the feature spec, ignored: 'notes' (train: 4 rows), "
    "'site' (train: 4 rows); add them to data.feature_spec to use them."
  ) in summary.format()
  m = manifest.read_manifest(str(output_dir))
  assert m.extra['preprocessing']['ignored_columns'] == {
    'train': {'notes': 4, 'site': 4},
    'eval': {},
  }
  assert m.split('train').clients == {'u1': 2, 'u2': 1}


def test_no_ignored_columns_no_line(digits):
  *_, output_dir, summary = digits
  assert summary.ignored_columns == {'train': {}, 'eval': {}}
  assert 'not in the feature spec' not in summary.format()
  assert manifest.read_manifest(str(output_dir)).extra['preprocessing']['ignored_columns'] == {
    'train': {},
    'eval': {},
  }


def test_clients_below_min_examples_are_excluded(tmp_path):
  rows = [f'u{k},0,1,5,0\n'.encode() for k, n in ((1, 1), (2, 2), (3, 3), (4, 5)) for _ in range(n)]
  train = tmp_path / 'train.csv'
  train.write_bytes(HEADER + b''.join(rows))
  output_dir = tmp_path / 'out'
  summary = _run(train, spec=SMALL_SPEC, output_dir=output_dir, min_examples=3)
  m = manifest.read_manifest(str(output_dir))
  assert m.split('train').clients == {'u3': 3, 'u4': 5}
  assert m.split('train').excluded_clients == {'u1': 1, 'u2': 2}
  assert _stored_clients(output_dir) == {'train': {'u3': 3, 'u4': 5}}
  assert summary.excluded_clients == {'train': {'u1': 1, 'u2': 2}}
  assert summary.rows_valid == {'train': 11} and summary.examples_written == {'train': 8}
  assert 'min_examples_per_client=3' in summary.format()

  with pytest.raises(pp.EmptyOutputError, match='data.min_examples_per_client=6'):
    _run(train, spec=SMALL_SPEC, output_dir=output_dir, min_examples=6)
  assert manifest.read_manifest(str(output_dir)).split('train').clients == {'u3': 3, 'u4': 5}


def test_spec_not_matching_header_leaves_existing_output_untouched(digits, tmp_path):
  raw, spec, good_output, _ = digits
  output_dir = tmp_path / 'clients'
  shutil.copytree(good_output, output_dir)
  before = _snapshot(output_dir)
  wrong = fs.FeatureSpec.from_json(
    {**spec.to_json(), 'features': [*spec.to_json()['features'][:-1], {'name': 'pixel_8_8'}]}
  )
  with pytest.raises(fs.FeatureSpecError) as info:
    _run(raw.train_file, raw.test_file, spec=wrong, output_dir=output_dir)
  assert "'pixel_8_8'" in str(info.value) and raw.train_file in str(info.value)
  assert _snapshot(output_dir) == before
  assert _siblings(output_dir) == ['clients']


def test_too_many_malformed_keeps_output_then_fixed_rerun_succeeds(tmp_path):
  train = tmp_path / 'train.csv'
  good_rows = b''.join(f'u{i % 3},{i % 3},{i % 10},5,0\n'.encode() for i in range(20))
  train.write_bytes(HEADER + good_rows)
  output_dir = tmp_path / 'out'
  _run(train, spec=SMALL_SPEC, output_dir=output_dir)
  before = _snapshot(output_dir)

  bad_rows = b'u1,0,x,5,0\n' * 3 + b'u1,0,1,5,inf\n' + b'u1,9,1,5,0\n'
  train.write_bytes(HEADER + good_rows + bad_rows)
  with pytest.raises(pp.TooManyMalformedRecordsError) as info:
    _run(train, spec=SMALL_SPEC, output_dir=output_dir, max_malformed=0.1)
  message = str(info.value)
  rejected = str(output_dir) + '.rejected'
  assert '5 of 25 rows' in message
  assert 'bad_label=1, non_finite=1, not_a_number=3' in message
  assert os.path.join(rejected, 'dead_letter') in message
  assert 'data.max_malformed_fraction' in message
  assert _snapshot(output_dir) == before
  assert len(_dead_letters(rejected, 'train')) == 5
  assert os.listdir(rejected) == ['dead_letter']  # Only the dead letters are kept.
  assert _siblings(output_dir) == ['out', 'out.rejected']

  # Within the limit now: the run succeeds, replaces the output, drops the rejected run.
  summary = _run(train, spec=SMALL_SPEC, output_dir=output_dir, max_malformed=0.2)
  assert summary.malformed == {'train': {'bad_label': 1, 'non_finite': 1, 'not_a_number': 3}}
  assert manifest.read_manifest(str(output_dir)).dead_letter['total'] == 5
  assert _siblings(output_dir) == ['out']


def test_input_file_errors(tmp_path):
  output_dir = tmp_path / 'out'
  with pytest.raises(pp.InputFilesError, match=r'no file matches data\.train_files=.*nope-\*\.csv'):
    _run(tmp_path / 'nope-*.csv', spec=SMALL_SPEC, output_dir=output_dir)
  (tmp_path / 'train.csv').write_bytes(HEADER + b'u1,0,1,5,0\n')
  with pytest.raises(pp.InputFilesError, match=r'data\.eval_files=.*missing\.jsonl'):
    _run(tmp_path / 'train.csv', tmp_path / 'missing.jsonl', spec=SMALL_SPEC, output_dir=output_dir)
  (tmp_path / 'dir.csv').mkdir()  # Matches, but cannot be read as a file.
  with pytest.raises(pp.InputFilesError, match=r'cannot read input file .*dir\.csv'):
    _run(tmp_path / 'dir.csv', spec=SMALL_SPEC, output_dir=output_dir)
  (tmp_path / 'train.parquet').write_bytes(b'PAR1')
  with pytest.raises(pp.InputFilesError, match=r'train\.parquet.*\*\.csv or \*\.jsonl'):
    _run(tmp_path / 'train.parquet', spec=SMALL_SPEC, output_dir=output_dir)
  with pytest.raises(pp.InputFilesError, match='both data.train_files and data.eval_files'):
    _run(tmp_path / 'train.csv', tmp_path / '*.csv', spec=SMALL_SPEC, output_dir=output_dir)
  if os.geteuid() != 0:  # Root reads any file.
    (tmp_path / 'secret.csv').write_bytes(HEADER)
    os.chmod(tmp_path / 'secret.csv', 0)
    with pytest.raises(pp.InputFilesError, match='secret.csv'):
      _run(tmp_path / 'secret.csv', spec=SMALL_SPEC, output_dir=output_dir)
  assert not output_dir.exists()
  assert _siblings(output_dir) == []


def test_empty_inputs_and_foreign_output_dir(tmp_path):
  (tmp_path / 'empty.csv').write_bytes(b'')
  with pytest.raises(pp.InputFilesError, match='no header line'):
    _run(tmp_path / 'empty.csv', spec=SMALL_SPEC, output_dir=tmp_path / 'out')
  (tmp_path / 'header_only.csv').write_bytes(HEADER)
  with pytest.raises(pp.EmptyOutputError, match='holds no rows'):
    _run(tmp_path / 'header_only.csv', spec=SMALL_SPEC, output_dir=tmp_path / 'out')
  (tmp_path / 'all_bad.csv').write_bytes(HEADER + b'u1,0,x,5,0\n')
  with pytest.raises(pp.EmptyOutputError, match='none of the 1 rows'):
    _run(tmp_path / 'all_bad.csv', spec=SMALL_SPEC, output_dir=tmp_path / 'out', max_malformed=1.0)
  assert _siblings(tmp_path / 'out') == []
  foreign = tmp_path / 'raw'
  foreign.mkdir()
  (foreign / 'train.csv').write_bytes(HEADER + b'u1,0,1,5,0\n')
  with pytest.raises(pp.OutputDirError, match='not a preprocessing output'):
    _run(foreign / 'train.csv', spec=SMALL_SPEC, output_dir=foreign)
  assert os.listdir(foreign) == ['train.csv']


def test_argument_and_runner_checks(tmp_path):
  (tmp_path / 'train.csv').write_bytes(HEADER + b'u1,0,1,5,0\n')
  with pytest.raises(pp.PreprocessArgumentError, match='data.min_examples_per_client'):
    _run(tmp_path / 'train.csv', spec=SMALL_SPEC, output_dir=tmp_path / 'out', min_examples=0)
  with pytest.raises(pp.PreprocessArgumentError, match='data.max_malformed_fraction'):
    _run(tmp_path / 'train.csv', spec=SMALL_SPEC, output_dir=tmp_path / 'out', max_malformed=1.5)
  with pytest.raises(pp.PipelineOptionsError, match='multi_threading'):
    _run(
      tmp_path / 'train.csv',
      spec=SMALL_SPEC,
      output_dir=tmp_path / 'out',
      flags=['--direct_running_mode=multi_threading'],
    )
  options = pp.resolve_pipeline_options(PipelineOptions([]))
  assert options.get_all_options()['runner'] == pp.DEFAULT_RUNNER
  options = pp.resolve_pipeline_options(PipelineOptions(['--runner=FlinkRunner']))
  assert options.get_all_options()['runner'] == 'FlinkRunner'


@pytest.mark.slow  # Starts Beam worker processes.
def test_multi_processing_workers_write_the_same_files(digits, tmp_path):
  # Worker processes run preprocess_dofns without TensorFlow; the client data
  # they give must be byte-identical to the in-process run's.
  raw, spec, output_dir, summary = digits
  again = _run(
    raw.train_file,
    raw.test_file,
    spec=spec,
    output_dir=tmp_path / 'mp',
    flags=['--direct_running_mode=multi_processing', '--direct_num_workers=2'],
  )
  assert again.clients_written == summary.clients_written
  assert again.examples_written == summary.examples_written

  def client_data_and_manifest(d):
    return {k: v for k, v in _snapshot(d).items() if k in ('clients.sqlite', 'manifest.json')}

  expected = client_data_and_manifest(output_dir)
  assert len(expected) == 2
  assert client_data_and_manifest(tmp_path / 'mp') == expected


def test_a_directory_in_the_per_client_layout_keeps_loading_and_is_replaced(digits, tmp_path):
  """Client data written before clients.sqlite (no storage in its manifest) still loads, trains
  and evaluates; preprocessing into it writes the new layout."""
  import fedpipe

  raw, spec, _, _ = digits
  old = tmp_path / 'old'
  rng = np.random.default_rng(0)
  clients = {f'u{i}': (rng.random((12, 3)), rng.integers(0, 3, 12)) for i in range(6)}
  write_client_data(old, clients, clients, num_classes=3, storage='tfrecord_per_client')
  data = json.loads((old / 'manifest.json').read_text())
  del data['storage']  # As the older fedpipe wrote it.
  (old / 'manifest.json').write_text(json.dumps(data))
  m = manifest.read_manifest(str(old))
  assert m.storage == manifest.STORAGE_TFRECORD_PER_CLIENT
  assert sorted(os.listdir(old)) == ['eval', 'manifest.json', 'train']

  def model():
    return tf.keras.Sequential([tf.keras.Input(shape=(3,)), tf.keras.layers.Dense(3)])

  # DP-FedAvg trains as cohorts (engine auto), FedAvg without DP per client.
  for name, dp in (
    ('cohort', {'dp__noise_multiplier': 1.0}),
    ('per_client', {'dp__enabled': False}),
  ):
    result = fedpipe.train(
      model,
      str(old),
      output_dir=str(tmp_path / name),
      progress=lambda p: None,
      training__rounds=2,
      training__clients_per_round=3,
      **dp,
    )
    assert len(result.metrics) == 2
    assert result.test_metrics['num_examples'] == 72, result.test_metrics

  # Preprocessing into it replaces it with the new layout.
  _run(raw.train_file, raw.test_file, spec=spec, output_dir=old)
  assert manifest.read_manifest(str(old)).storage == manifest.STORAGE_SQLITE
  assert sorted(os.listdir(old)) == ['clients.sqlite', 'dead_letter', 'manifest.json']
