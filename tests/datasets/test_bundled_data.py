"""Tests of fedpipe.datasets.bundled_data: splits, partitions and the written files."""

import csv
import json
import os

import numpy as np
import pytest

from fedpipe.datasets import bundled_data
from fedpipe.pipelines import feature_spec as fs


def _label_shares(assignment, labels, num_clients):
  """Per client, the share of its most frequent label."""
  shares = []
  for client in range(num_clients):
    counts = np.bincount(labels[assignment == client])
    shares.append(counts.max() / counts.sum())
  return np.array(shares)


def _read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


class TestPartitions:
  def test_iid_near_equal_and_deterministic(self):
    a = bundled_data.partition_iid(103, 10, np.random.default_rng(1))
    counts = np.bincount(a, minlength=10)
    assert counts.sum() == 103
    assert set(counts) == {10, 11}
    b = bundled_data.partition_iid(103, 10, np.random.default_rng(1))
    c = bundled_data.partition_iid(103, 10, np.random.default_rng(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)

  @pytest.mark.parametrize('alpha', [0.01, 0.1, 1.0, 100.0])
  def test_dirichlet_no_empty_client_and_deterministic(self, alpha):
    labels = np.random.default_rng(0).integers(0, 10, size=500)
    a = bundled_data.partition_dirichlet(labels, 100, alpha, np.random.default_rng(3))
    counts = np.bincount(a, minlength=100)
    assert counts.sum() == 500 and counts.min() >= 1
    b = bundled_data.partition_dirichlet(labels, 100, alpha, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)

  def test_dirichlet_small_alpha_is_skewed(self):
    labels = np.random.default_rng(0).integers(0, 10, size=2000)
    iid = bundled_data.partition_iid(2000, 20, np.random.default_rng(0))
    skewed = bundled_data.partition_dirichlet(labels, 20, 0.1, np.random.default_rng(0))
    mild = bundled_data.partition_dirichlet(labels, 20, 100.0, np.random.default_rng(0))
    # IID clients of ~100 rows over 10 labels: the top label holds ~15-20%.
    assert _label_shares(iid, labels, 20).mean() < 0.3
    assert _label_shares(mild, labels, 20).mean() < 0.3
    assert _label_shares(skewed, labels, 20).mean() > 0.6

  def test_too_many_clients(self):
    with pytest.raises(bundled_data.BundledDataError, match='num_clients=11'):
      bundled_data.partition_iid(10, 11, np.random.default_rng(0))

  def test_stratified_test_split(self):
    labels = np.repeat(np.arange(4), [50, 30, 10, 10])
    mask = bundled_data.stratified_test_split(labels, 0.2, np.random.default_rng(0))
    assert [int(mask[labels == k].sum()) for k in range(4)] == [10, 6, 2, 2]


class TestWriteBundledDataset:
  def test_digits_csv(self, tmp_path):
    raw_dir = str(tmp_path / 'raw')
    result = bundled_data.write_bundled_dataset(
      source='sklearn:digits', raw_dir=raw_dir, num_clients=30, seed=5
    )
    assert sorted(os.listdir(raw_dir)) == [
      'feature_spec.json',
      'generation.json',
      'test.csv',
      'train.csv',
    ]
    assert not [p for p in os.listdir(tmp_path) if p != 'raw']  # No temp dir left.
    train, test = _read_csv(result.train_file), _read_csv(result.test_file)
    assert (len(train), len(test)) == (result.num_train_rows, result.num_test_rows)
    assert len(train) + len(test) == 1797
    assert abs(len(test) / 1797 - 0.2) < 0.01
    header = list(train[0])
    assert header[:3] == ['client_id', 'label', 'pixel_0_0'] and len(header) == 66
    keys = {f'user_{i:04d}' for i in range(30)}
    train_counts = {}
    for row in train:
      train_counts[row['client_id']] = train_counts.get(row['client_id'], 0) + 1
    assert set(train_counts) == keys
    assert set(train_counts.values()) <= {len(train) // 30, len(train) // 30 + 1}
    assert {row['client_id'] for row in test} <= keys
    spec = fs.FeatureSpec.load(result.feature_spec_file)
    assert spec.num_features == 64 and spec.num_classes == 10
    assert all((f.min, f.max, f.mean) == (0.0, 16.0, None) for f in spec.features)
    for row in train[:50]:
      spec.parse_record(row)  # Every written row is valid.
    # The test split is stratified: each digit's share is about the same.
    labels = np.array([int(r['label']) for r in test])
    assert np.bincount(labels).min() >= 34

  def test_same_parameters_reuse_and_overwrite(self, tmp_path):
    raw_dir = str(tmp_path / 'raw')
    kwargs = dict(source='sklearn:wine', raw_dir=raw_dir, num_clients=5, seed=1)
    first = bundled_data.write_bundled_dataset(**kwargs)
    mtime = os.stat(first.train_file).st_mtime_ns
    again = bundled_data.write_bundled_dataset(**kwargs)
    assert again.reused and not first.reused
    assert again.num_train_rows == first.num_train_rows
    assert os.stat(first.train_file).st_mtime_ns == mtime
    forced = bundled_data.write_bundled_dataset(**kwargs, overwrite=True)
    assert not forced.reused
    with open(first.train_file) as f:
      before = f.read()
    changed = bundled_data.write_bundled_dataset(**{**kwargs, 'seed': 2})
    assert not changed.reused
    with open(first.train_file) as f:
      assert f.read() != before
    params = json.load(open(os.path.join(raw_dir, 'generation.json')))['params']
    assert params['seed'] == 2 and params['source'] == 'sklearn:wine'

  def test_deterministic_by_seed(self, tmp_path):
    def write(name, seed):
      result = bundled_data.write_bundled_dataset(
        source='sklearn:wine',
        raw_dir=str(tmp_path / name),
        num_clients=7,
        partition='dirichlet',
        dirichlet_alpha=0.3,
        seed=seed,
      )
      with open(result.train_file) as f, open(result.test_file) as g:
        return f.read() + g.read()

    assert write('a', 3) == write('b', 3)
    assert write('a', 3) != write('c', 4)

  def test_refuses_foreign_directory(self, tmp_path):
    raw_dir = tmp_path / 'mine'
    raw_dir.mkdir()
    (raw_dir / 'precious.csv').write_text('do not delete')
    with pytest.raises(bundled_data.BundledDataError, match='--overwrite'):
      bundled_data.write_bundled_dataset(source='sklearn:wine', raw_dir=str(raw_dir), num_clients=5)
    assert (raw_dir / 'precious.csv').read_text() == 'do not delete'

  def test_breast_cancer_jsonl_dirichlet(self, tmp_path):
    result = bundled_data.write_bundled_dataset(
      source='sklearn:breast_cancer',
      raw_dir=str(tmp_path / 'raw'),
      raw_format='jsonl',
      num_clients=40,
      partition='dirichlet',
      dirichlet_alpha=0.1,
      seed=0,
    )
    assert result.train_file.endswith('train.jsonl')
    spec = fs.FeatureSpec.load(result.feature_spec_file)
    assert spec.num_features == 30 and spec.num_classes == 2
    assert spec.features[0].name == 'mean_radius'
    assert all(f.mean is not None and f.std > 0 and f.min is None for f in spec.features)
    with open(result.train_file) as f:
      records = [json.loads(line) for line in f]
    assert len({r['client_id'] for r in records}) == 40
    xs = np.array([spec.parse_record(r)[1] for r in records])
    # Standardized with the training split's own statistics.
    np.testing.assert_allclose(xs.mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(xs.std(axis=0), 1.0, atol=1e-9)

  @pytest.mark.parametrize(
    'kwargs, field',
    [
      (dict(source='sklearn:iris'), 'data.source'),
      (dict(raw_format='parquet'), 'data.raw_format'),
      (dict(partition='label'), 'data.partition'),
      (dict(num_clients=0), 'data.num_clients'),
      (dict(num_clients=300, source='sklearn:wine'), 'data.num_clients=300'),
      (dict(test_fraction=1.0), 'data.test_fraction'),
      (dict(partition='dirichlet', dirichlet_alpha=0.0), 'data.dirichlet_alpha'),
    ],
  )
  def test_invalid_parameters_name_config_field(self, tmp_path, kwargs, field):
    args = dict(source='sklearn:digits', raw_dir=str(tmp_path / 'raw'), num_clients=10)
    args.update(kwargs)
    with pytest.raises(bundled_data.BundledDataError, match=field.replace('.', r'\.')):
      bundled_data.write_bundled_dataset(**args)
    assert not os.path.exists(tmp_path / 'raw')
    assert os.listdir(tmp_path) == []

  def test_sanitize_column_name(self):
    assert bundled_data.sanitize_column_name('mean radius') == 'mean_radius'
    assert (
      bundled_data.sanitize_column_name('od280/od315_of_diluted_wines')
      == 'od280_od315_of_diluted_wines'
    )
    assert bundled_data.sanitize_column_name('3d') == 'f_3d'
