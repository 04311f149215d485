"""The silo's statistics pipeline on real files with Beam's local runner."""

import csv
import json
import math

import numpy as np
import pytest

from fedpipe.pipelines import feature_statistics
from fedpipe.statistics import mechanism
from fedpipe.statistics import query as query_lib
from tests.statistics import draft_spec

SPEC = draft_spec.SPEC
COLUMNS = draft_spec.COLUMNS


def _query(**changes):
  fields = dict(
    name='t',
    feature_spec=SPEC,
    histogram_bins={'age': 8, 'income': 5},
    max_rows_per_user=5,
    noise_multiplier=0.0,
    threshold_delta=1e-7,
  )
  return query_lib.StatisticsQuery(**dict(fields, **changes))


def _rows(seed, users, rows_per_user=(1, 5)):
  rng = np.random.default_rng(seed)
  out = []
  for u in range(users):
    region = ['north', 'south', 'east'][u % 3]
    for _ in range(int(rng.integers(*rows_per_user, endpoint=True))):
      out.append(
        {
          'user': f'u{seed}-{u}',
          'age': str(round(float(rng.uniform(18, 100)), 3)),
          'income': str(round(float(rng.uniform(0, 200)), 2)),
          'region': region,
          'device': ['ios', 'android'][u % 2],
          'y': str(int(rng.integers(0, 2))),
        }
      )
  return out


def _write_csv(path, rows, extra_lines=()):
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, COLUMNS, lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)
    for line in extra_lines:
      f.write(line + '\n')
  return str(path)


def test_statistics_match_numpy_and_malformed_rows_are_counted_by_reason(tmp_path):
  rows = _rows(0, 30)
  jsonl_rows = _rows(1, 10)
  _write_csv(tmp_path / 'a.csv', rows, ['u9,abc,1,north,ios,0', ',30,1,north,ios,1'])
  with open(tmp_path / 'b.jsonl', 'w') as f:
    for r in jsonl_rows:
      f.write(json.dumps(dict(r, age=float(r['age']), y=int(r['y']))) + '\n')
    f.write('not json\n')
  q = _query()
  csv_stats = feature_statistics.compute_silo_statistics(q, raw_data=str(tmp_path / 'a.csv'))
  both = feature_statistics.compute_silo_statistics(q, raw_data=str(tmp_path / '*'))
  assert csv_stats.malformed == {'not_a_number': 1, 'empty_client_key': 1}
  assert both.malformed == {'not_a_number': 1, 'empty_client_key': 1, 'bad_json': 1}
  assert both.rows_read == len(rows) + len(jsonl_rows) + 3
  valid = rows + jsonl_rows
  assert both.rows == len(valid) and both.users == 40 and both.rows_over_limit == 0
  for c in q.numeric:
    x = np.array([float(r[c.name]) for r in valid])
    got = both.numeric[c.name]
    assert got.sum == pytest.approx((x - c.center).sum(), rel=1e-12, abs=1e-9)
    assert got.sum_of_squares == pytest.approx(((x - c.center) ** 2).sum(), rel=1e-12)
    hist = np.histogram(x, bins=c.bins, range=(c.min, c.max))[0]
    assert list(got.histogram) == list(hist)
  users_per_region = {}
  for r in valid:
    users_per_region.setdefault(r['region'], set()).add(r['user'])
  assert both.categorical['region'] == {k: float(len(v)) for k, v in users_per_region.items()}


def test_a_user_moves_every_statistic_by_at_most_its_sensitivity(tmp_path):
  """Noise off, with and without one user with 40 rows at the extremes and 6 devices."""
  base = _rows(2, 20)
  heavy = [
    {
      'user': 'heavy',
      'age': '100' if i % 2 else '18',
      'income': '200',
      'region': ['north', 'south', 'west', 'mars'][i % 4],
      'device': f'dev{i % 6}',
      'y': '1',
    }
    for i in range(40)
  ]
  q = _query()
  without = feature_statistics.compute_silo_statistics(
    q, raw_data=_write_csv(tmp_path / 'without.csv', base)
  )
  with_user = feature_statistics.compute_silo_statistics(
    q, raw_data=_write_csv(tmp_path / 'with.csv', base + heavy)
  )
  assert with_user.rows_over_limit == 35 and with_user.values_over_limit >= 1
  # The same run again chooses the same rows and values (a deterministic hash).
  again = feature_statistics.compute_silo_statistics(q, raw_data=str(tmp_path / 'with.csv'))
  assert again.to_json() == with_user.to_json()
  a, b = (mechanism.release(s, q) for s in (without, with_user))  # Noise off: the exact values.
  sens = mechanism.block_sensitivities(q)
  moved = {'rows': abs(b['rows'] - a['rows'])}
  for c in q.numeric:
    for key in ('sum', 'sum_of_squares'):
      moved[f'{key}/{c.name}'] = abs(b['numeric'][c.name][key] - a['numeric'][c.name][key])
    moved[f'histogram/{c.name}'] = float(
      np.linalg.norm(
        np.subtract(b['numeric'][c.name]['histogram'], a['numeric'][c.name]['histogram'])
      )
    )
  for c in q.categorical:
    before, after = a['categorical'][c.name]['counts'], b['categorical'][c.name]['counts']
    values = set(before) | set(after)
    moved[f'categorical/{c.name}'] = math.sqrt(
      sum((after.get(v, 0) - before.get(v, 0)) ** 2 for v in values)
    )
  for block, distance in moved.items():
    assert distance <= sens[block] * (1 + 1e-12), block
  scaled = math.sqrt(sum((moved[k] / sens[k]) ** 2 for k in moved))
  assert scaled <= math.sqrt(mechanism.block_count(q)) * (1 + 1e-12)
  assert moved['rows'] == 5  # The bound is reached: the user keeps exactly 5 rows.


def test_a_spec_this_version_reads_otherwise_and_missing_files_are_refused(tmp_path):
  with pytest.raises(feature_statistics.StatisticsInputError, match='no file matches'):
    feature_statistics.compute_silo_statistics(_query(), raw_data=str(tmp_path / 'none*.csv'))
  bad = tmp_path / 'bad.csv'
  bad.write_text('user,age\nu,3\n')
  with pytest.raises(feature_statistics.StatisticsInputError, match='header lacks'):
    feature_statistics.compute_silo_statistics(_query(), raw_data=str(bad))
