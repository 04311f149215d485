"""Tests of fedpipe.datasets.synthetic_credit and its bundled source `synthetic_credit`."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedpipe.datasets import bundled_data
from fedpipe.datasets import synthetic_credit as sc
from fedpipe.pipelines import feature_spec as fs
from tests.conftest import REPO_ROOT

SOURCE = 'synthetic_credit'


def _write(tmp_path, name='raw', **kwargs):
  args = dict(source=SOURCE, raw_dir=str(tmp_path / name), num_clients=300, seed=0)
  args.update(kwargs)
  return bundled_data.write_bundled_dataset(**args)


def _read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def _all_bytes(raw_dir):
  out = {}
  for name in sorted(os.listdir(raw_dir)):
    with open(os.path.join(raw_dir, name), 'rb') as f:
      out[name] = f.read()
  return out


@pytest.fixture(scope='module')
def population():
  """The default population: 6,000 users, seed 0."""
  return sc.generate(6000, sc.random_generators(0)[0])


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  """The default files: 6,000 users, seed 0, test fraction 0.2, CSV."""
  return _write(tmp_path_factory.mktemp('credit'), num_clients=6000)


class TestPopulation:
  def test_shape_and_ranges(self, population):
    rows_per_user = np.bincount(population.user)
    assert len(rows_per_user) == 6000
    assert rows_per_user.min() >= 3 and rows_per_user.max() <= 15
    assert 40_000 <= len(population) <= 50_000
    # Skewed to few rows: 3 is the most common count, and the median user
    # has fewer rows than the mean.
    counts = np.bincount(rows_per_user)
    assert counts.argmax() == 3 and counts[3] > 3 * counts[15]
    assert np.median(rows_per_user) < rows_per_user.mean()
    for name, (low, high) in sc.DECLARED_RANGES.items():
      values = getattr(population, name)
      assert values.min() >= low and values.max() <= high, name
    for name in ('age', 'income', 'tenure_months'):
      values = getattr(population, name)
      np.testing.assert_array_equal(values, np.rint(values))
    np.testing.assert_array_equal(population.balance, np.round(population.balance, 2))
    assert set(population.region) == set(sc.REGIONS)
    assert set(population.product) == set(sc.PRODUCTS)
    # Age, income and region are the user's: one value per user.
    for name in ('age', 'income', 'region'):
      values = getattr(population, name)
      starts = np.flatnonzero(np.r_[True, np.diff(population.user) != 0])
      first = np.repeat(values[starts], rows_per_user)
      assert (values == first).all(), name

  def test_rare_region_is_held_by_few_users(self, population):
    users = {
      region: len(set(population.user[population.region == region])) for region in sc.REGIONS
    }
    assert 10 <= users[sc.RARE_REGION] <= 60, users
    assert min(v for k, v in users.items() if k != sc.RARE_REGION) >= 500, users

  def test_label_rate_and_signal(self, population):
    rate = population.label.mean()
    assert 0.3 <= rate <= 0.45
    # The labels follow the true probabilities.
    assert abs(population.probability.mean() - rate) < 0.01
    risky = population.region == sc.RARE_REGION
    assert population.label[risky].mean() > rate + 0.2

  def test_true_logit_is_the_documented_model(self):
    logit = sc.true_logit(
      age=np.array([45.0, 60.0]),
      income=np.array([np.exp(10.65), np.exp(10.65 + 0.6)]),
      balance=np.array([np.expm1(9.0), np.expm1(10.5)]),
      tenure_months=np.array([40.0, 80.0]),
      region=['north', sc.RARE_REGION],
      product=['card', 'mortgage'],
    )
    # All z = 0: intercept - 0.7 (the centred age square) + card.
    assert logit[0] == pytest.approx(-1.3 - 0.7 + 0.9)
    # All z = 1: the coefficients' sum, plus the rare region and mortgage.
    expected = -1.3 - 1.1 + 0.0 - 1.8 + 2.0 - 1.25 + 2.7 - 2.5
    assert logit[1] == pytest.approx(expected)

  def test_unknown_category_names_the_field(self):
    with pytest.raises(sc.SyntheticCreditError, match="region='mars'"):
      sc.true_logit(
        age=np.array([30.0]),
        income=np.array([40_000.0]),
        balance=np.array([100.0]),
        tenure_months=np.array([5.0]),
        region=['mars'],
        product=['card'],
      )

  @pytest.mark.parametrize('num_users', [0, sc.MAX_USERS + 1, True, 2.5])
  def test_invalid_number_of_users(self, num_users):
    with pytest.raises(sc.SyntheticCreditError, match='data.num_clients'):
      sc.generate(num_users, np.random.default_rng(0))

  def test_keep_a_training_row(self):
    user = np.array([0, 0, 1, 1, 1, 2])
    is_test = np.array([True, True, False, True, True, True])
    kept = sc.keep_a_training_row(is_test, user)
    np.testing.assert_array_equal(kept, [False, True, False, True, True, False])
    assert is_test[0]  # The input is not changed.


class TestWrittenFiles:
  def test_files_and_split(self, written):
    raw_dir = written.raw_dir
    assert sorted(os.listdir(raw_dir)) == [
      'feature_spec.json',
      'feature_spec_central.json',
      'generation.json',
      'test.csv',
      'train.csv',
    ]
    assert written.central_feature_spec_file == os.path.join(raw_dir, 'feature_spec_central.json')
    train, test = _read_csv(written.train_file), _read_csv(written.test_file)
    assert (len(train), len(test)) == (written.num_train_rows, written.num_test_rows)
    assert list(train[0]) == ['client_id', 'label', *sc.FEATURES]
    total = len(train) + len(test)
    assert abs(len(test) / total - 0.2) < 0.01
    train_users = {r['client_id'] for r in train}
    assert train_users == set(bundled_data.client_keys(6000))
    assert {r['client_id'] for r in test} <= train_users
    # The split is stratified: the same label rate on both sides.
    rates = [np.mean([int(r['label']) for r in rows]) for rows in (train, test)]
    assert abs(rates[0] - rates[1]) < 0.01
    assert {r['region'] for r in train} == set(sc.REGIONS)
    generation = json.load(open(os.path.join(raw_dir, 'generation.json')))
    assert generation['params']['source'] == SOURCE
    assert generation['params']['source_version'] == sc.GENERATOR_VERSION

  def test_bayes_accuracy_is_in_the_intended_band(self, written):
    truth = sc.ground_truth_accuracy(written.test_file)
    assert truth.num_rows == written.num_test_rows
    assert 0.80 <= truth.bayes_accuracy <= 0.85
    assert 0.80 <= truth.expected_bayes_accuracy <= 0.85
    # Learnable but not trivial: well above the majority class.
    assert truth.bayes_accuracy > max(truth.positive_rate, 1 - truth.positive_rate) + 0.12
    assert 0.3 < truth.bayes_log_loss < 0.45

  def test_draft_feature_spec_follows_the_contract(self, written):
    spec = json.load(open(written.feature_spec_file))
    assert spec == sc.draft_feature_spec()
    assert spec['schema_version'] == 2 and spec['client_key'] == 'client_id'
    assert spec['label'] == {'name': 'label', 'task': 'binary'}
    assert [f['name'] for f in spec['features']] == list(sc.FEATURES)
    for feature in spec['features']:
      if feature['type'] == 'numeric':
        low, high = sc.DECLARED_RANGES[feature['name']]
        assert feature == {'name': feature['name'], 'type': 'numeric', 'min': low, 'max': high}
      else:
        assert feature['type'] == 'categorical'
        assert set(feature) == {'name', 'type', 'max_values_per_user'}
    assert spec['features'][4] == {
      'name': 'region',
      'type': 'categorical',
      'max_values_per_user': 1,
    }

  def test_central_feature_spec_is_computed_from_the_pooled_training_rows(self, written):
    central = json.load(open(written.central_feature_spec_file))
    draft = json.load(open(written.feature_spec_file))
    train = _read_csv(written.train_file)
    for full, bare in zip(central['features'], draft['features']):
      assert {k: v for k, v in full.items() if k not in ('mean', 'std', 'vocabulary')} == bare
      values = [r[full['name']] for r in train]
      if full['type'] == 'numeric':
        numbers = np.array(values, dtype=np.float64)
        assert full['mean'] == pytest.approx(numbers.mean(), rel=1e-12)
        assert full['std'] == pytest.approx(numbers.std(), rel=1e-12)
      else:
        assert full['vocabulary'] == sorted(set(values))
    assert sc.RARE_REGION in central['features'][4]['vocabulary']

  def test_specs_load_the_draft_as_a_draft(self, written):
    draft = fs.FeatureSpec.load(written.feature_spec_file)
    central = fs.FeatureSpec.load(written.central_feature_spec_file)
    assert draft.is_draft and not central.is_draft
    assert draft.schema_version == central.schema_version == 2
    train = _read_csv(written.train_file)
    for record in train[:200]:
      draft.parse_columns(record)  # Every written row is valid, even before statistics.
      key, x, y = central.parse_record(record)
      # 4 numbers, then region's and product's one-hot slices (each + 1 out-of-vocabulary).
      assert len(x) == 4 + (6 + 1) + (4 + 1) and y in (0, 1)
      assert sum(x[4:11]) == 1 and sum(x[11:]) == 1 and x[10] == 0 and x[15] == 0


class TestBundledSource:
  def test_same_seed_same_bytes(self, tmp_path):
    a = _all_bytes(_write(tmp_path, 'a', seed=3).raw_dir)
    b = _all_bytes(_write(tmp_path, 'b', seed=3).raw_dir)
    c = _all_bytes(_write(tmp_path, 'c', seed=4).raw_dir)
    assert a == b
    assert a['train.csv'] != c['train.csv'] and a['test.csv'] != c['test.csv']
    assert a['feature_spec.json'] == c['feature_spec.json']
    assert a['feature_spec_central.json'] != c['feature_spec_central.json']

  def test_jsonl_has_the_same_rows(self, tmp_path):
    as_csv = _write(tmp_path, 'csv', seed=1)
    as_jsonl = _write(tmp_path, 'jsonl', seed=1, raw_format='jsonl')
    assert as_jsonl.train_file.endswith('train.jsonl')
    with open(as_jsonl.train_file) as f:
      records = [json.loads(line) for line in f]
    assert [str(v) for v in records[0].values()] == list(_read_csv(as_csv.train_file)[0].values())
    first = records[0]
    assert isinstance(first['age'], int) and isinstance(first['income'], int)
    assert isinstance(first['region'], str) and isinstance(first['product'], str)
    assert sc.ground_truth_accuracy(as_jsonl.test_file) == sc.ground_truth_accuracy(
      as_csv.test_file
    )

  def test_reuse_and_parameters(self, tmp_path):
    first = _write(tmp_path)
    again = _write(tmp_path)
    assert again.reused and not first.reused
    assert again.central_feature_spec_file == first.central_feature_spec_file
    with pytest.raises(bundled_data.BundledDataError, match=r"data\.partition='dirichlet'"):
      _write(tmp_path, 'skewed', partition='dirichlet')
    with pytest.raises(bundled_data.BundledDataError, match=r'data\.num_clients'):
      _write(tmp_path, 'huge', num_clients=sc.MAX_USERS + 1)
    assert sorted(os.listdir(tmp_path)) == ['raw']

  def test_other_sources_record_no_source_version(self):
    params = bundled_data.GenerationParams('sklearn:wine', 'csv', 5, 'iid', None, 0.2, 1)
    assert 'source_version' not in params.to_json()

  def test_ground_truth_of_a_missing_or_foreign_file(self, tmp_path):
    with pytest.raises(sc.SyntheticCreditError, match='fedpipe-make-data'):
      sc.ground_truth_accuracy(str(tmp_path / 'nope.csv'))
    foreign = tmp_path / 'foreign.csv'
    foreign.write_text('client_id,label,x\nu,1,2\n')
    with pytest.raises(sc.SyntheticCreditError, match='lacks column'):
      sc.ground_truth_accuracy(str(foreign))


def test_make_data_writes_the_credit_config(tmp_path):
  raw = tmp_path / 'raw'
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'fedpipe.cli.make_data',
      '--config=configs/credit_binary.py',
      f'--config.data.raw_dir={raw}',
      f'--config.data.train_files={raw}/train.csv',
      f'--config.data.eval_files={raw}/test.csv',
      f'--config.data.feature_spec={raw}/feature_spec.json',
    ],
    cwd=REPO_ROOT,
    env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'},
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr
  assert 'Wrote synthetic_credit' in result.stdout and 'over 6000 clients' in result.stdout
  assert 'note:' not in result.stdout
  assert sorted(os.listdir(raw)) == [
    'feature_spec.json',
    'feature_spec_central.json',
    'generation.json',
    'test.csv',
    'train.csv',
  ]
  assert 0.80 <= sc.ground_truth_accuracy(str(raw / 'test.csv')).bayes_accuracy <= 0.85
