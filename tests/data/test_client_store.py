"""Tests of fedpipe.data.client_store: the clients.sqlite layout, written and queried with SQLite."""

import os
import random
import sqlite3

import pytest

from fedpipe.data import client_store
from fedpipe.data import manifest as manifest_lib
from fedpipe.errors import FedpipeError


def _clients(num_clients=50, seed=0):
  """split -> client id -> records (distinct bytes, NULs and high bytes included)."""
  rng = random.Random(seed)
  out = {}
  for split in ('train', 'eval'):
    out[split] = {
      f'u{i:03d}': [
        bytes([0, i % 256, 255]) + f'{split}-{i}-{s}'.encode() for s in range(rng.randint(1, 9))
      ]
      for i in range(num_clients)
    }
  return out


def _query(path, sql):
  db = sqlite3.connect(client_store.reader_uri(path), uri=True)
  try:
    return db.execute(sql).fetchall()
  finally:
    db.close()


def test_rows_come_back_per_client_in_order_by_the_readers_queries(tmp_path):
  clients = _clients()
  path = str(tmp_path / manifest_lib.STORE_FILENAME)
  rows = list(client_store.rows_of_clients(clients))
  assert client_store.write_store(path, rows) == len(rows)

  before, after = client_store.client_query('train')
  assert [r for (r,) in _query(path, before + 'u007' + after)] == clients['train']['u007']
  assert client_store.read_client(path, 'eval', 'u007') == clients['eval']['u007']
  assert _query(path, before + 'nobody' + after) == []

  before, between, after = client_store.cohort_query('eval')
  cohort = ['u040', 'u002', 'u017']
  got = _query(path, before + between.join(cohort) + after)
  # Ordered by client id, then each client's own order.
  assert got == [(c, r) for c in sorted(cohort) for r in clients['eval'][c]]
  assert client_store.client_counts(path) == {
    split: {c: len(r) for c, r in by_client.items()} for split, by_client in clients.items()
  }


def test_queries_read_the_primary_key_in_order_without_sorting(tmp_path):
  path = str(tmp_path / 'c.sqlite')
  client_store.write_store(path, client_store.rows_of_clients(_clients()))
  before, between, after = client_store.cohort_query('train')
  for sql in (
    client_store.client_query('train')[0] + 'u001' + client_store.client_query('train')[1],
    before + between.join(['u001', 'u009']) + after,
  ):
    plan = ' '.join(row[-1] for row in _query(path, 'EXPLAIN QUERY PLAN ' + sql))
    assert 'USING PRIMARY KEY' in plan and 'TEMP B-TREE' not in plan, plan


def test_the_file_has_a_fixed_page_size_layout_version_and_a_clustered_table(tmp_path):
  path = str(tmp_path / 'c.sqlite')
  client_store.write_store(path, [('train', 'a', 0, b'r')])
  assert _query(path, 'PRAGMA page_size') == [(client_store.PAGE_SIZE,)]
  assert _query(path, 'PRAGMA application_id') == [(client_store.APPLICATION_ID,)]
  assert _query(path, 'PRAGMA user_version') == [(client_store.LAYOUT_VERSION,)]
  assert _query(path, 'PRAGMA journal_mode') == [('delete',)]
  ((sql,),) = _query(path, "SELECT sql FROM sqlite_schema WHERE name = 'records'")
  assert 'PRIMARY KEY (split, client_id, seq)' in sql and 'WITHOUT ROWID' in sql
  # Readers open it read-only.
  db = sqlite3.connect(client_store.reader_uri(path), uri=True)
  with pytest.raises(sqlite3.OperationalError, match='readonly'):
    db.execute("INSERT INTO records VALUES ('train', 'b', 0, x'00')")
  db.close()


def test_clients_in_any_order_give_the_same_bytes_as_sorted_rows(tmp_path):
  clients = _clients(num_clients=300, seed=3)
  sorted_path = str(tmp_path / 'sorted.sqlite')
  client_store.write_store(sorted_path, client_store.rows_of_clients(clients))
  shuffled = [(s, c, r) for s, by_client in clients.items() for c, r in by_client.items()]
  random.Random(1).shuffle(shuffled)
  path = str(tmp_path / 'from_clients.sqlite')

  counts = client_store.write_store_from_clients(path, iter(shuffled))

  with open(sorted_path, 'rb') as a, open(path, 'rb') as b:
    assert a.read() == b.read()
  assert counts == {
    s: {c: len(r) for c, r in by_client.items()} for s, by_client in clients.items()
  }
  assert sorted(os.listdir(tmp_path)) == ['from_clients.sqlite', 'sorted.sqlite']  # No scratch.


@pytest.mark.parametrize(
  'rows, message',
  [
    ([('train', 'b', 0, b''), ('train', 'a', 0, b'')], 'out of order'),
    ([('train', 'a', 0, b''), ('train', 'a', 0, b'')], 'out of order'),
    ([('eval', 'a', 1, b''), ('eval', 'a', 0, b'')], 'out of order'),
    ([('test', 'a', 0, b'')], 'split must be one of'),
    ([('train', "a' OR '1'='1", 0, b'')], 'not a valid client id'),
    ([('train', '../a', 0, b'')], 'not a valid client id'),
    ([('train', 'a', 0, 'text')], 'record must be bytes'),
  ],
)
def test_bad_rows_are_refused_and_leave_no_file(tmp_path, rows, message):
  path = str(tmp_path / 'c.sqlite')
  with pytest.raises(client_store.ClientStoreError, match=message) as error:
    client_store.write_store(path, rows)
  assert isinstance(error.value, FedpipeError)
  assert os.listdir(tmp_path) == []


def test_a_repeated_client_or_an_existing_file_is_refused(tmp_path):
  path = str(tmp_path / 'c.sqlite')
  twice = [('train', 'a', [b'1']), ('eval', 'a', [b'2']), ('train', 'a', [b'3'])]
  with pytest.raises(
    client_store.ClientStoreError, match="client 'a' of split 'train' comes twice"
  ):
    client_store.write_store_from_clients(path, twice)
  assert os.listdir(tmp_path) == []
  client_store.write_store(path, [('train', 'a', 0, b'')])
  with pytest.raises(client_store.ClientStoreError, match='exists'):
    client_store.write_store(path, [('train', 'a', 0, b'')])
  with pytest.raises(client_store.ClientStoreError, match='exists'):
    client_store.write_store_from_clients(path, [])


def test_reader_uri_is_read_only_and_immutable():
  assert client_store.reader_uri() == 'file:clients.sqlite?mode=ro&immutable=1'
  assert client_store.reader_uri('/a b/c.sqlite') == 'file:/a%20b/c.sqlite?mode=ro&immutable=1'
  with pytest.raises(client_store.ClientStoreError, match='split must be one of'):
    client_store.client_query('test')
