"""Tests of feature spec schema version 2: label tasks, weights, categorical features."""

import dataclasses
import json

import pytest

from fedpipe.pipelines import feature_spec as fs


def _v2(**overrides):
  data = {
    'schema_version': 2,
    'client_key': 'client_id',
    'label': {'name': 'label', 'task': 'multiclass', 'num_classes': 3},
    'weight': {'name': 'w', 'max': 10.0},
    'features': [
      {'name': 'age', 'type': 'numeric', 'min': 18.0, 'max': 100.0, 'mean': 41.0, 'std': 12.0},
      {'name': 'region', 'type': 'categorical', 'vocabulary': ['north', 'south', '3']},
      {'name': 'score', 'min': 0.0, 'max': 10.0},
    ],
  }
  data.update(overrides)
  return data


def _record(**overrides):
  record = {'client_id': 'u1', 'label': '2', 'w': '0.5', 'age': '53', 'region': 'south', 'score': 5}
  record.update(overrides)
  return record


@pytest.fixture
def spec():
  return fs.FeatureSpec.from_json(_v2())


def test_v2_round_trip(spec, tmp_path):
  path = str(tmp_path / 'spec.json')
  spec.save(path)
  loaded = fs.FeatureSpec.load(path)
  assert loaded == spec and loaded.schema_version == 2
  again = loaded.to_json()
  assert fs.FeatureSpec.from_json(again) == spec
  assert again['weight'] == {'name': 'w', 'max': 10.0}
  assert again['features'][1] == {
    'name': 'region',
    'type': 'categorical',
    'vocabulary': ['north', 'south', '3'],
    'max_values_per_user': 1,
  }
  assert spec.columns == ('client_id', 'label', 'w', 'age', 'region', 'score')
  assert spec.num_features == 1 + 4 + 1 and spec.num_classes == 3 and spec.num_outputs == 3
  assert not spec.is_draft


def test_a_v1_spec_loads_as_multiclass_and_writes_v1():
  data = {
    'schema_version': 1,
    'client_key': 'c',
    'label': {'name': 'y', 'num_classes': 4},
    'features': [{'name': 'a', 'min': 0.0, 'max': 1.0}],
  }
  spec = fs.FeatureSpec.from_json(data)
  assert spec.label.task == fs.MULTICLASS and spec.weight is None
  assert spec.to_json() == data
  # A v2 spec that uses no v2 field is the same spec, written as v1.
  v2 = {**data, 'schema_version': 2, 'label': {'name': 'y', 'task': 'multiclass', 'num_classes': 4}}
  assert fs.FeatureSpec.from_json(v2) == spec
  # The constructors other code uses keep working.
  built = fs.FeatureSpec(
    client_key='c',
    label=fs.LabelSpec(name='y', num_classes=4),
    features=(fs.FeatureColumn(name='a', min=0.0, max=1.0),),
  )
  assert built == spec


def test_v1_refuses_v2_fields_and_says_so():
  data = {
    'schema_version': 1,
    'client_key': 'c',
    'label': {'name': 'y', 'num_classes': 4},
    'features': [{'name': 'a', 'type': 'categorical'}],
  }
  with pytest.raises(fs.FeatureSpecError, match='schema_version": 2'):
    fs.FeatureSpec.from_json(data)


def test_categorical_one_hot_and_out_of_vocabulary(spec):
  layout = spec.input_layout()
  assert [(s.name, s.kind, s.start, s.width) for s in layout] == [
    ('age', 'numeric', 0, 1),
    ('region', 'categorical', 1, 4),
    ('score', 'numeric', 5, 1),
  ]
  assert layout[1].vocabulary == ('north', 'south', '3')
  key, x, y = spec.parse_record(_record())
  assert (key, y) == ('u1', 2)
  assert x == [1.0, 0.0, 1.0, 0.0, 0.0, 0.5]
  _, x, _ = spec.parse_record(_record(region='  west '))
  assert x[1:5] == [0.0, 0.0, 0.0, 1.0]  # The out-of-vocabulary slot.
  _, x, _ = spec.parse_record(_record(region=3))  # A JSON number, as str() writes it.
  assert x[1:5] == [0.0, 0.0, 1.0, 0.0]
  assert spec.parse_weighted_record(_record())[3] == 0.5


def test_parse_columns_gives_raw_values_and_needs_no_vocabulary(spec):
  parsed = spec.parse_columns(_record(region=' East '))
  assert parsed == fs.ParsedColumns(
    client_key='u1', numeric=(53.0, 5.0), categorical=('East',), label=2, weight=0.5
  )
  draft = fs.FeatureSpec.from_json(
    _v2(features=[{'name': 'region', 'type': 'categorical', 'max_values_per_user': 2}])
  )
  assert draft.is_draft
  assert draft.parse_columns(_record()).categorical == ('south',)
  with pytest.raises(fs.FeatureSpecError, match=r"'region'.*fedpipe-stats.*vocabulary"):
    draft.parse_record(_record())
  with pytest.raises(fs.FeatureSpecError, match='fedpipe-stats'):
    _ = draft.num_features
  with pytest.raises(fs.FeatureSpecError, match='fedpipe-stats'):
    draft.input_layout()
  # Federated statistics completes it with dataclasses.replace.
  column = dataclasses.replace(draft.features[0], vocabulary=['south', 'north'])
  done = dataclasses.replace(draft, features=(column,))
  assert not done.is_draft and done.num_features == 3
  assert done.parse_record(_record())[1] == [1.0, 0.0, 0.0]
  no_weight = fs.FeatureSpec.from_json({k: v for k, v in _v2().items() if k != 'weight'})
  assert no_weight.parse_columns(_record(w='garbage')).weight == 1.0


def test_parse_columns_raises_as_parse_record(spec):
  for record in (_record(age='17'), _record(w='-1'), _record(region=None), _record(label='9')):
    with pytest.raises(fs.MalformedRecordError) as a:
      spec.parse_columns(record)
    with pytest.raises(fs.MalformedRecordError) as b:
      spec.parse_record(record)
    assert (a.value.reason, a.value.detail) == (b.value.reason, b.value.detail)


@pytest.mark.parametrize(
  'raw, expected',
  [
    ('0', 0),
    ('1', 1),
    (' 1 ', 1),
    ('true', 1),
    ('False', 0),
    (True, 1),
    (False, 0),
    (1, 1),
    (0.0, 0),
  ],
)
def test_binary_labels(raw, expected):
  spec = fs.FeatureSpec.from_json(_v2(label={'name': 'label', 'task': 'binary'}))
  assert spec.num_classes == 2 and spec.num_outputs == 1
  assert spec.parse_record(_record(label=raw))[2] == expected


def test_regression_labels():
  spec = fs.FeatureSpec.from_json(
    _v2(label={'name': 'label', 'task': 'regression', 'min': -1.0, 'max': 100.0})
  )
  assert spec.num_classes == 0 and spec.num_outputs == 1
  assert spec.parse_record(_record(label=' 2.5 '))[2] == 2.5
  assert spec.parse_record(_record(label=7))[2] == 7.0


_BINARY = {'name': 'label', 'task': 'binary'}
_REGRESSION = {'name': 'label', 'task': 'regression', 'min': 0.0, 'max': 1.0}


@pytest.mark.parametrize(
  'label, overrides, reason, detail',
  [
    (None, {'region': ''}, fs.MISSING_VALUE, 'region'),
    (None, {'region': None}, fs.MISSING_VALUE, 'region'),
    (None, {'region': [1]}, fs.BAD_CATEGORY, 'region=[1]'),
    (None, {'region': {'a': 1}}, fs.BAD_CATEGORY, 'region'),
    (None, {'w': ''}, fs.MISSING_VALUE, 'weight'),
    (None, {'w': 'heavy'}, fs.BAD_WEIGHT, "w='heavy'"),
    (None, {'w': '-0.5'}, fs.BAD_WEIGHT, '[0, 10.0]'),
    (None, {'w': '11'}, fs.BAD_WEIGHT, '[0, 10.0]'),
    (None, {'w': 'inf'}, fs.BAD_WEIGHT, 'finite'),
    (None, {'w': True}, fs.BAD_WEIGHT, 'w=True'),
    (_BINARY, {'label': '2'}, fs.BAD_LABEL, '0/1'),
    (_BINARY, {'label': 'yes'}, fs.BAD_LABEL, '0/1'),
    (_BINARY, {'label': 0.5}, fs.BAD_LABEL, '0/1'),
    (_BINARY, {'label': ''}, fs.MISSING_VALUE, 'label'),
    (_REGRESSION, {'label': 'high'}, fs.BAD_LABEL, 'not a number'),
    (_REGRESSION, {'label': 'nan'}, fs.BAD_LABEL, 'not finite'),
    (_REGRESSION, {'label': True}, fs.BAD_LABEL, 'not a number'),
    (_REGRESSION, {'label': '1.5'}, fs.LABEL_OUT_OF_RANGE, '[0.0, 1.0]'),
  ],
)
def test_malformed_v2_records(label, overrides, reason, detail):
  spec = fs.FeatureSpec.from_json(_v2(**({'label': label} if label else {})))
  with pytest.raises(fs.MalformedRecordError) as info:
    spec.parse_weighted_record(_record(**overrides))
  assert info.value.reason == reason and reason in fs.REASONS
  assert detail in info.value.detail
  record = _record(**overrides)
  (column,) = overrides
  del record[column]
  with pytest.raises(fs.MalformedRecordError) as info:
    spec.parse_columns(record)
  assert info.value.reason == fs.MISSING_FIELD


def _feature(**fields):
  return {'name': 'region', 'type': 'categorical', **fields}


@pytest.mark.parametrize(
  'overrides, field',
  [
    ({'label': {'name': 'label', 'task': 'ordinal'}}, 'label.task'),
    ({'label': {'name': 'label', 'task': 3}}, 'label.task'),
    ({'label': {'name': 'label', 'task': 'multiclass'}}, 'label.num_classes'),
    ({'label': {'name': 'label', 'task': 'multiclass', 'num_classes': 1}}, 'label.num_classes'),
    ({'label': {'name': 'label', 'task': 'binary', 'num_classes': 2}}, 'num_classes'),
    ({'label': {'name': 'label', 'task': 'multiclass', 'num_classes': 3, 'min': 0}}, 'min'),
    ({'label': {'name': 'label', 'task': 'regression', 'min': 'low'}}, 'label.min'),
    ({'label': {'name': 'label', 'task': 'regression', 'max': True}}, 'label.max'),
    ({'label': {'name': 'label', 'task': 'regression', 'min': 2, 'max': 1}}, 'label.min'),
    ({'label': {'name': '', 'task': 'binary'}}, 'label.name'),
    ({'weight': 'w'}, 'weight'),
    ({'weight': {}}, 'weight.name'),
    ({'weight': {'name': ''}}, 'weight.name'),
    ({'weight': {'name': 7}}, 'weight.name'),
    ({'weight': {'name': 'label'}}, 'weight.name'),
    ({'weight': {'name': 'client_id'}}, 'weight.name'),
    ({'weight': {'name': 'w', 'max': 0}}, 'weight.max'),
    ({'weight': {'name': 'w', 'max': 'big'}}, 'weight.max'),
    ({'weight': {'name': 'w', 'min': 0}}, 'min'),
    ({'features': [{'name': 'a', 'type': 'text'}]}, 'features[0].type'),
    ({'features': [{'name': 'a', 'type': None}]}, 'features[0].type'),
    ({'features': [_feature(vocabulary='north')]}, 'features[0].vocabulary'),
    ({'features': [_feature(vocabulary=[])]}, 'features[0].vocabulary'),
    ({'features': [_feature(vocabulary=['a', 'a'])]}, 'features[0].vocabulary'),
    ({'features': [_feature(vocabulary=['a', ''])]}, 'features[0].vocabulary'),
    ({'features': [_feature(vocabulary=['a', ' b'])]}, 'features[0].vocabulary'),
    ({'features': [_feature(vocabulary=['a', 3])]}, 'features[0].vocabulary'),
    (
      {'features': [_feature(vocabulary=[str(i) for i in range(10_001)])]},
      'features[0].vocabulary',
    ),
    ({'features': [_feature(max_values_per_user=0)]}, 'features[0].max_values_per_user'),
    ({'features': [_feature(max_values_per_user=1.5)]}, 'features[0].max_values_per_user'),
    ({'features': [_feature(max_values_per_user=True)]}, 'features[0].max_values_per_user'),
    ({'features': [{'name': 'a', 'max_values_per_user': 2}]}, 'max_values_per_user'),
    ({'features': [{'name': 'a', 'vocabulary': ['x']}]}, 'vocabulary'),
    ({'features': [_feature(min=0)]}, 'min'),
    ({'features': [_feature(), _feature()]}, 'features[1].name'),
    ({'features': [{'name': 'w'}]}, 'features[0].name'),
  ],
)
def test_bad_v2_fields_name_the_field(tmp_path, overrides, field):
  path = tmp_path / 'spec.json'
  path.write_text(json.dumps(_v2(**overrides)))
  with pytest.raises(fs.FeatureSpecError) as info:
    fs.FeatureSpec.load(str(path))
  assert str(path) in str(info.value)
  assert field in str(info.value)


@pytest.mark.parametrize(
  'change, field',
  [
    (lambda s: dataclasses.replace(s, label=fs.LabelSpec(name='label', task='nope')), 'label.task'),
    (lambda s: dataclasses.replace(s, weight=fs.WeightSpec(name='age')), 'weight.name'),
    (
      lambda s: dataclasses.replace(
        s, features=(dataclasses.replace(s.features[1], vocabulary=('a', 'a')),)
      ),
      'features[0].vocabulary',
    ),
    (
      lambda s: dataclasses.replace(s, features=(dataclasses.replace(s.features[0], kind='x'),)),
      'features[0].type',
    ),
  ],
)
def test_constructed_specs_are_checked_too(spec, change, field):
  with pytest.raises(fs.FeatureSpecError, match=field.replace('[', r'\[').replace(']', r'\]')):
    change(spec)


def test_fast_path_and_general_path_agree_for_numeric_specs():
  numeric = fs.FeatureSpec.from_json(
    _v2(features=[{'name': 'age', 'mean': 41.0, 'std': 12.0}, {'name': 'score', 'max': 10.0}])
  )
  record = _record(age=' 30.5 ', score='1e-3')
  assert numeric.parse_record(record)[1] == numeric._parse_features(record)
