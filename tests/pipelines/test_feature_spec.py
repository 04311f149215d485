"""Tests of fedpipe.pipelines.feature_spec and fedpipe.data.client_ids."""

import json
import math

import pytest

from fedpipe.data import client_ids, manifest
from fedpipe.pipelines import feature_spec as fs


def _spec_json(**overrides):
  data = {
    'schema_version': 1,
    'client_key': 'client_id',
    'label': {'name': 'label', 'num_classes': 3},
    'features': [
      {'name': 'a', 'min': 0.0, 'max': 10.0},
      {'name': 'b', 'mean': 5.0, 'std': 2.0},
      {'name': 'c'},
      {'name': 'd', 'min': -1.0},
    ],
  }
  data.update(overrides)
  return data


@pytest.fixture
def spec():
  return fs.FeatureSpec.from_json(_spec_json())


def _record(**overrides):
  record = {'client_id': 'user_1', 'label': '2', 'a': '5', 'b': '9', 'c': '-3.5', 'd': '0'}
  record.update(overrides)
  return record


class TestSpecFile:
  def test_round_trip(self, spec, tmp_path):
    path = str(tmp_path / 'spec.json')
    spec.save(path)
    loaded = fs.FeatureSpec.load(path)
    assert loaded == spec
    assert loaded.to_json() == _spec_json()
    assert loaded.num_features == 4 and loaded.num_classes == 3
    assert loaded.columns == ('client_id', 'label', 'a', 'b', 'c', 'd')

  def test_missing_file_names_it(self, tmp_path):
    path = str(tmp_path / 'nope.json')
    with pytest.raises(fs.FeatureSpecError, match='nope.json'):
      fs.FeatureSpec.load(path)

  def test_bad_json_names_file(self, tmp_path):
    path = tmp_path / 'spec.json'
    path.write_text('{"schema_version": 1,')
    with pytest.raises(fs.FeatureSpecError, match=r'spec\.json.*not valid JSON'):
      fs.FeatureSpec.load(str(path))

  @pytest.mark.parametrize(
    'overrides, field',
    [
      ({'client_key': ''}, 'client_key'),
      ({'label': {'name': 'label'}}, 'label.num_classes'),
      ({'label': {'name': 'label', 'num_classes': 1}}, 'label.num_classes'),
      ({'label': {'name': 'label', 'num_classes': '3'}}, 'label.num_classes'),
      ({'features': []}, 'features'),
      ({'features': [{'name': 'a', 'min': 1.0, 'max': 1.0}]}, "'a'"),
      ({'features': [{'name': 'a', 'mean': 1.0}]}, 'mean/std'),
      ({'features': [{'name': 'a', 'mean': 1.0, 'std': 0.0}]}, 'std'),
      ({'features': [{'name': 'a', 'maximum': 1.0}]}, 'maximum'),
      ({'features': [{'name': 'a', 'min': 'zero'}]}, 'features[0].min'),
      ({'features': [{'name': 'a'}, {'name': 'a'}]}, 'features[1].name'),
      ({'features': [{'name': 'label'}]}, 'features[0].name'),
      ({'schema_version': 3}, 'schema_version'),
      ({'extra': 1}, 'extra'),
    ],
  )
  def test_invalid_spec_names_file_and_field(self, tmp_path, overrides, field):
    path = tmp_path / 'spec.json'
    path.write_text(json.dumps(_spec_json(**overrides)))
    with pytest.raises(fs.FeatureSpecError) as info:
      fs.FeatureSpec.load(str(path))
    assert str(path) in str(info.value)
    assert field in str(info.value)

  def test_check_columns_names_missing_columns_and_source(self, spec):
    spec.check_columns(['d', 'c', 'b', 'a', 'label', 'client_id', 'other'], source='f.csv')
    with pytest.raises(fs.FeatureSpecError, match=r"f\.csv.*2 column.*'label', 'b'"):
      spec.check_columns(['client_id', 'a', 'c', 'd'], source='f.csv')
    with pytest.raises(fs.FeatureSpecError, match=r"repeats column\(s\) \['a'\]"):
      spec.check_columns(['client_id', 'label', 'a', 'a', 'b', 'c', 'd'], source='f.csv')


class TestParseRecord:
  def test_normalization(self, spec):
    key, x, y = spec.parse_record(_record(client_id='  user_1 '))
    assert key == 'user_1'
    assert y == 2
    assert x == [0.5, 2.0, -3.5, 0.0]  # min-max, standardized, raw, raw (min only).

  def test_json_values(self, spec):
    key, x, y = spec.parse_record(_record(client_id=17, label=1.0, a=10, b=5.0, c=1e300))
    assert (key, y) == ('17', 1)
    assert x == [1.0, 0.0, 1e300, 0.0]

  @pytest.mark.parametrize(
    'overrides, reason, detail',
    [
      ({'a': ''}, fs.MISSING_VALUE, 'a'),
      ({'a': None}, fs.MISSING_VALUE, 'a'),
      ({'b': 'five'}, fs.NOT_A_NUMBER, "b='five'"),
      ({'b': True}, fs.NOT_A_NUMBER, 'b=True'),
      ({'b': [1]}, fs.NOT_A_NUMBER, 'b=[1]'),
      ({'c': 'nan'}, fs.NON_FINITE, 'c'),
      ({'c': '-inf'}, fs.NON_FINITE, 'c'),
      ({'a': '10.5'}, fs.OUT_OF_RANGE, 'a=10.5'),
      ({'d': '-2'}, fs.OUT_OF_RANGE, 'd=-2.0'),
      ({'label': '3'}, fs.BAD_LABEL, '[0, 3)'),
      ({'label': '-1'}, fs.BAD_LABEL, 'label=-1'),
      ({'label': '1.5'}, fs.BAD_LABEL, 'not an integer'),
      ({'label': 'cat'}, fs.BAD_LABEL, 'not an integer'),
      ({'label': True}, fs.BAD_LABEL, 'not an integer'),
      ({'label': ' '}, fs.MISSING_VALUE, 'label'),
      ({'client_id': '  '}, fs.EMPTY_CLIENT_KEY, 'client_id'),
      ({'client_id': None}, fs.EMPTY_CLIENT_KEY, 'client_id'),
    ],
  )
  def test_malformed(self, spec, overrides, reason, detail):
    with pytest.raises(fs.MalformedRecordError) as info:
      spec.parse_record(_record(**overrides))
    assert info.value.reason == reason
    assert reason in fs.REASONS
    assert detail in info.value.detail

  @pytest.mark.parametrize('column', ['client_id', 'label', 'c'])
  def test_missing_field(self, spec, column):
    record = _record()
    del record[column]
    with pytest.raises(fs.MalformedRecordError) as info:
      spec.parse_record(record)
    assert info.value.reason == fs.MISSING_FIELD
    assert repr(column) in info.value.detail

  def test_fast_and_careful_paths_agree(self, spec):
    # Values the fast path accepts must normalize exactly like the
    # feature-by-feature path.
    record = _record(a=' 3.25 ', b='1e-3', c='1_000', d='7')
    _, x, _ = spec.parse_record(record)
    assert x == spec._parse_features(record)
    assert math.isclose(x[1], (1e-3 - 5.0) / 2.0)

  def test_error_is_picklable(self):
    import pickle

    error = pickle.loads(pickle.dumps(fs.MalformedRecordError(fs.BAD_JSON, 'x')))
    assert (error.reason, error.detail) == (fs.BAD_JSON, 'x')


class TestClientIds:
  @pytest.mark.parametrize('key', ['user_0007', 'A', 'a.b-c_d', 'x' * 128])
  def test_safe_keys_are_kept(self, key):
    assert client_ids.client_id_for_key(key) == key

  @pytest.mark.parametrize(
    'key', ['alice@example.com', '../etc', '.hidden', 'a b', 'x' * 129, 'é', '-lead']
  )
  def test_other_keys_are_hashed(self, key):
    client_id = client_ids.client_id_for_key(key)
    assert client_id == client_ids.client_id_for_key(key)
    assert client_id.startswith('k') and len(client_id) == 21
    assert manifest.is_valid_client_id(client_id)
    assert client_id != client_ids.client_id_for_key(key + '!')

  def test_empty_key_is_rejected(self):
    with pytest.raises(ValueError, match='client_key'):
      client_ids.client_id_for_key('')
