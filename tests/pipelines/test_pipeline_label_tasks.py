"""The Beam preprocessing pipeline on v2 feature specs: label tasks, weights, categorical features."""

import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from apache_beam.options.pipeline_options import PipelineOptions

from fedpipe.computations import client_data
from fedpipe.data import client_store
from fedpipe.data import manifest as manifest_lib
from fedpipe.pipelines import feature_spec as fs
from fedpipe.pipelines import pipeline as pp

BINARY_SPEC = {
  'schema_version': 2,
  'client_key': 'client_id',
  'label': {'name': 'label', 'task': 'binary'},
  'weight': {'name': 'w'},
  'features': [
    {'name': 'age', 'min': 0.0, 'max': 100.0},
    {'name': 'region', 'type': 'categorical', 'vocabulary': ['north', 'south']},
  ],
}
REGRESSION_SPEC = {
  'schema_version': 2,
  'client_key': 'client_id',
  'label': {'name': 'label', 'task': 'regression', 'min': -10.0, 'max': 10.0},
  'features': [{'name': 'a', 'mean': 0.0, 'std': 2.0}],
}


def _run(train, eval_files=None, *, spec, output_dir, max_malformed=0.5):
  return pp.run_preprocessing(
    train_files=str(train),
    eval_files=None if eval_files is None else str(eval_files),
    feature_spec=spec,
    output_dir=str(output_dir),
    min_examples_per_client=1,
    max_malformed_fraction=max_malformed,
    pipeline_options=PipelineOptions([]),
  )


def _records(output_dir, split, client_id, manifest):
  description = client_data._feature_description(
    manifest.num_features, label_task=manifest.label_task, weighted=manifest.weighted
  )
  path = os.path.join(output_dir, manifest_lib.STORE_FILENAME)
  return [
    {k: v.numpy().tolist() for k, v in tf.io.parse_single_example(r, description).items()}
    for r in client_store.read_client(path, split, client_id)
  ]


def _dead_letters(directory, split='train'):
  lines = []
  for path in sorted(glob.glob(os.path.join(directory, 'dead_letter', f'{split}-*.jsonl'))):
    with open(path) as f:
      lines.extend(json.loads(line) for line in f if line.strip())
  return sorted(lines, key=lambda d: d['line_number'])


def test_binary_records_with_categorical_features_and_weights(tmp_path):
  rows = [
    {'client_id': 'u1', 'label': 1, 'w': 2.0, 'age': 50, 'region': 'north'},
    {'client_id': 'u1', 'label': 'false', 'w': '0.5', 'age': '25', 'region': ' west '},
    {'client_id': 'u2', 'label': True, 'w': 1, 'age': 100, 'region': 'south'},
    {'client_id': 'u2', 'label': 2, 'w': 1, 'age': 1, 'region': 'north'},  # bad_label
    {'client_id': 'u2', 'label': 0, 'w': -1, 'age': 1, 'region': 'north'},  # bad_weight
    {'client_id': 'u2', 'label': 0, 'w': 1, 'age': 1, 'region': ''},  # missing_value
    {'client_id': 'u2', 'label': 0, 'w': 1, 'age': 1, 'region': ['north']},  # bad_category
    {'client_id': 'u2', 'label': 0, 'age': 1, 'region': 'north'},  # missing_field (w)
  ]
  raw = tmp_path / 'train.jsonl'
  raw.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  spec = fs.FeatureSpec.from_json(BINARY_SPEC)
  out = tmp_path / 'out'
  _run(raw, spec=spec, output_dir=out, max_malformed=0.7)
  manifest = manifest_lib.read_manifest(str(out))
  assert (manifest.label_task, manifest.weighted) == ('binary', True)
  assert manifest.num_features == 1 + 3 and manifest.num_classes == 2
  assert manifest.record_format == {
    'x': {'dtype': 'float32', 'shape': [4]},
    'y': {'dtype': 'int64', 'shape': []},
    'w': {'dtype': 'float32', 'shape': []},
  }
  assert fs.FeatureSpec.from_json(manifest.feature_spec) == spec
  assert _records(out, 'train', 'u1', manifest) == [
    {'x': [0.5, 1.0, 0.0, 0.0], 'y': 1, 'w': 2.0},
    {'x': [0.25, 0.0, 0.0, 1.0], 'y': 0, 'w': 0.5},  # 'west': the out-of-vocabulary slot.
  ]
  assert _records(out, 'train', 'u2', manifest) == [{'x': [1.0, 0.0, 1.0, 0.0], 'y': 1, 'w': 1.0}]
  reasons = [d['reason'] for d in _dead_letters(out)]
  assert reasons == ['bad_label', 'bad_weight', 'missing_value', 'bad_category', 'missing_field']
  assert manifest.dead_letter['by_reason'] == {
    'bad_category': 1,
    'bad_label': 1,
    'bad_weight': 1,
    'missing_field': 1,
    'missing_value': 1,
  }


def test_regression_records_from_csv(tmp_path):
  raw = tmp_path / 'train.csv'
  raw.write_text('client_id,label,a\nu1,2.5,1\nu1,-0.25,-4\nu2,11,0\nu2,high,0\nu3,0,2\n')
  out = tmp_path / 'out'
  _run(raw, spec=fs.FeatureSpec.from_json(REGRESSION_SPEC), output_dir=out)
  manifest = manifest_lib.read_manifest(str(out))
  assert manifest.label_task == 'regression' and not manifest.weighted
  assert manifest.record_format['y'] == {'dtype': 'float32', 'shape': []}
  assert 'w' not in manifest.record_format
  assert _records(out, 'train', 'u1', manifest) == [
    {'x': [0.5], 'y': 2.5},
    {'x': [-2.0], 'y': -0.25},
  ]
  assert [d['reason'] for d in _dead_letters(out)] == ['label_out_of_range', 'bad_label']


def test_a_draft_spec_is_refused_before_the_pipeline_runs(tmp_path):
  draft = dict(BINARY_SPEC, features=[{'name': 'region', 'type': 'categorical'}])
  raw = tmp_path / 'train.csv'
  raw.write_text('client_id,label,w,region\nu1,1,1,north\n')
  with pytest.raises(fs.FeatureSpecError, match="'region'.*fedpipe-stats"):
    _run(raw, spec=fs.FeatureSpec.from_json(draft), output_dir=tmp_path / 'out')
  assert not (tmp_path / 'out').exists()


def test_csv_header_must_have_the_weight_column(tmp_path):
  raw = tmp_path / 'train.csv'
  raw.write_text('client_id,label,age,region\nu1,1,3,north\n')
  with pytest.raises(fs.FeatureSpecError, match="'w'"):
    _run(raw, spec=fs.FeatureSpec.from_json(BINARY_SPEC), output_dir=tmp_path / 'out')


def test_input_layout_matches_written_x(tmp_path):
  spec = fs.FeatureSpec.from_json(BINARY_SPEC)
  layout = spec.input_layout()
  x = np.array(
    spec.parse_record({'client_id': 'a', 'label': 0, 'w': 1, 'age': 0, 'region': 'x'})[1]
  )
  region = layout[1]
  assert x[region.start : region.start + region.width].tolist() == [0.0, 0.0, 1.0]
