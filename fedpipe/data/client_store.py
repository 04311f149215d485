"""The SQLite layout of client data: every client's records in one file, `clients.sqlite`.

One TFRecord file per client (the `tfrecord_per_client` layout, see
`fedpipe.data.manifest`) means 100,000 files for 100,000 users and one open
per user per round. The `sqlite` layout keeps them all in one table,

    CREATE TABLE records (
      split     TEXT    NOT NULL,   -- 'train' or 'eval'
      client_id TEXT    NOT NULL,   -- manifest.CLIENT_ID_PATTERN
      seq       INTEGER NOT NULL,   -- 0, 1, ...: the record's place in its client's order
      record    BLOB    NOT NULL,   -- a serialized tf.train.Example (record_schema)
      PRIMARY KEY (split, client_id, seq)
    ) WITHOUT ROWID

as TFF's own `tff.simulation.datasets.SqlClientData` stores clients. The
table is clustered on its key, so one client's records, or a cohort's
(`client_id IN (...)`), are a few runs of adjacent pages, read in `seq`
order without a sort. A client's records keep the order its TFRecord file
would have had, so both layouts give the same batches.

The readers, in `fedpipe.computations`, run the queries of `client_query` and
`cohort_query` with `tf.data.experimental.SqlDataset` (which reads BLOBs as
`tf.string`), building the query text in the graph from the client ids. That
is safe only because the ids are checked against `manifest.CLIENT_ID_PATTERN`
(no quotes) before the query is built; the pieces here are what goes around
them. They open the file read-only and immutable (`reader_uri`): no locks, no
journal, nothing written, as on a silo's read-only data mount.

`write_store` writes the file: a fresh database with a fixed page size, rows
inserted in key order in one transaction, no timestamps, so the same rows
give the same bytes (with the same SQLite library). Like this whole layer it
does not import TensorFlow.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence

from fedpipe.data import manifest as manifest_lib
from fedpipe.errors import FedpipeError

TABLE = 'records'
# 4096 is SQLite's default; with ~300-byte digits records a 10-example client
# is one or two pages. Fixed, so the file's bytes do not depend on the library's default.
PAGE_SIZE = 4096
# `PRAGMA application_id` ('fdpc') and `user_version`: what the file is, and its layout version.
APPLICATION_ID = 0x66647063
LAYOUT_VERSION = 1

_COLUMNS = ('split', 'client_id', 'seq', 'record')
_CREATE_TABLE = (
  f'CREATE TABLE {TABLE} ('
  'split TEXT NOT NULL, client_id TEXT NOT NULL, seq INTEGER NOT NULL, record BLOB NOT NULL, '
  'PRIMARY KEY (split, client_id, seq)) WITHOUT ROWID'
)
_INSERT = f'INSERT INTO {TABLE} ({", ".join(_COLUMNS)}) VALUES (?, ?, ?, ?)'
_UNSORTED_SUFFIX = '.unsorted'

Row = tuple[str, str, int, bytes]


class ClientStoreError(FedpipeError, ValueError):
  """A `clients.sqlite` cannot be written as asked (rows out of order or invalid, file exists)."""


def _check_split(split: str) -> str:
  if split not in manifest_lib.SPLITS:
    raise ClientStoreError(f'split must be one of {manifest_lib.SPLITS}, got {split!r}')
  return split


def reader_uri(path: str = manifest_lib.STORE_FILENAME) -> str:
  """The SQLite URI readers open: `path` read-only and immutable (no locks, no journal).

  Args:
    path: The database file; relative paths are relative to the reader's
      working directory (a worker's is its data directory).

  Returns:
    A `file:` URI, e.g. `file:clients.sqlite?mode=ro&immutable=1`.
  """
  return f'file:{urllib.parse.quote(path)}?mode=ro&immutable=1'


def client_query(split: str) -> tuple[str, str]:
  """The query of one client's records in order, as the text before and after its id.

  `before + client_id + after` selects the `record` column of the client's
  rows of `split`, in `seq` order. The id goes between single quotes:
  only an id that fully matches `manifest.CLIENT_ID_PATTERN` (which has no
  quote) may be put there.

  Raises:
    ClientStoreError: For an unknown split.
  """
  _check_split(split)
  return (
    f"SELECT record FROM {TABLE} WHERE split = '{split}' AND client_id = '",
    "' ORDER BY seq",
  )


def cohort_query(split: str) -> tuple[str, str, str]:
  """The query of several clients' records, as the text before, between and after their ids.

  `before + between.join(ids) + after` selects `(client_id, record)` of
  every row of `split` whose client is one of `ids`, ordered by client id
  (bytewise) then `seq`. As for `client_query`, only valid client ids may be
  joined in.

  Raises:
    ClientStoreError: For an unknown split.
  """
  _check_split(split)
  return (
    f"SELECT client_id, record FROM {TABLE} WHERE split = '{split}' AND client_id IN ('",
    "', '",
    "') ORDER BY client_id, seq",
  )


def _checked_in_order(rows: Iterable[Row]) -> Iterator[Row]:
  """`rows`, checked to be valid and strictly ascending by (split, client_id, seq)."""
  previous: tuple[str, str, int] | None = None
  for row in rows:
    split, client_id, seq, record = row
    key = (split, client_id, seq)
    if previous is None or key[:2] != previous[:2]:
      if split not in manifest_lib.SPLITS:
        raise ClientStoreError(f'row {key!r}: split must be one of {manifest_lib.SPLITS}')
      if not isinstance(client_id, str) or not manifest_lib.is_valid_client_id(client_id):
        raise ClientStoreError(
          f'row {key!r}: {client_id!r} is not a valid client id '
          f'({manifest_lib.CLIENT_ID_PATTERN}); rename the client.'
        )
    if previous is not None and key <= previous:
      raise ClientStoreError(
        f'rows out of order: {key!r} after {previous!r}; write_store takes rows sorted by '
        '(split, client_id, seq), each key once (pass presorted=False to have them sorted).'
      )
    if not isinstance(record, bytes):
      raise ClientStoreError(f'row {key!r}: record must be bytes, got {type(record).__name__}')
    previous = key
    yield row


def _check_new(path: str) -> None:
  if os.path.lexists(path):
    raise ClientStoreError(
      f'{path!r} exists; client data is written to a new file (remove it, or write to a new '
      'path and rename it into place).'
    )


def _create(path: str) -> sqlite3.Connection:
  """A new, empty database at `path` with the table, its page size and identifiers set."""
  _check_new(path)
  db = sqlite3.connect(path, isolation_level=None)
  try:
    # Before anything is written: fixed page size, no journal (the file is
    # built under a temporary name and renamed into place whole).
    db.execute(f'PRAGMA page_size = {PAGE_SIZE}')
    db.execute('PRAGMA journal_mode = OFF')
    db.execute('PRAGMA synchronous = OFF')
    db.execute('PRAGMA locking_mode = EXCLUSIVE')
    db.execute('PRAGMA cache_size = -65536')  # KiB.
    db.execute('BEGIN')
    db.execute(f'PRAGMA application_id = {APPLICATION_ID}')
    db.execute(f'PRAGMA user_version = {LAYOUT_VERSION}')
    db.execute(_CREATE_TABLE)
  except BaseException:
    db.close()
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
    raise
  return db


def write_store(path: str, rows: Iterable[Row]) -> int:
  """Writes `rows` as a new `clients.sqlite` at `path`, in one transaction.

  The same rows give the same file, byte for byte (with the same SQLite
  library): the page size is fixed, nothing records a time, and rows are
  inserted in key order into a fresh database.

  Args:
    path: The file to create (a local path); it must not exist. Write it
      under a temporary name and rename it into place.
    rows: `(split, client_id, seq, record)` tuples, strictly ascending by
      `(split, client_id, seq)` (checked): `split` one of `manifest.SPLITS`,
      `client_id` a valid client id, `seq` the record's place in its
      client's order, `record` a serialized `tf.train.Example`. For clients
      that come in another order, see `write_store_from_clients`.

  Returns:
    The number of rows written.

  Raises:
    ClientStoreError: If `path` exists, or a row is invalid or out of order;
      `path` is then removed.
    OSError, sqlite3.Error: If the file cannot be written; `path` is then removed.
  """
  db = _create(path)
  done = False
  try:
    count = db.executemany(_INSERT, _checked_in_order(rows)).rowcount
    db.execute('COMMIT')
    done = True
  finally:
    db.close()
    if not done:
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
  return count


def write_store_from_clients(
  path: str, clients: Iterable[tuple[str, str, Iterable[bytes]]]
) -> dict[str, dict[str, int]]:
  """Writes clients that come in any order as a new `clients.sqlite` at `path` (see `write_store`).

  For clients read from shards in whatever order a pipeline wrote them:
  their records are appended to a scratch database next to `path`
  (`<path>.unsorted`, removed after) as they come, then copied into `path`
  client by client in key order, so memory stays bounded and the file is
  the one `write_store` writes for the same rows.

  Args:
    path: The file to create (a local path); it must not exist.
    clients: `(split, client_id, records)`, each client of a split once,
      its records in its order (they get seq 0, 1, ...).

  Returns:
    Split -> client id -> number of records written.

  Raises:
    ClientStoreError: If `path` exists, a client repeats, or a split, id or
      record is invalid; `path` is then removed.
    OSError, sqlite3.Error: If a file cannot be written; `path` is then removed.
  """
  _check_new(path)
  scratch = path + _UNSORTED_SUFFIX
  with contextlib.suppress(FileNotFoundError):
    os.remove(scratch)
  counts: dict[str, dict[str, int]] = {}
  db = sqlite3.connect(scratch, isolation_level=None)
  try:
    for pragma in ('journal_mode = OFF', 'synchronous = OFF', 'locking_mode = EXCLUSIVE'):
      db.execute(f'PRAGMA {pragma}')
    db.execute('BEGIN')
    db.execute('CREATE TABLE scratch_records (record BLOB NOT NULL)')
    db.execute(
      'CREATE TABLE scratch_clients (split TEXT NOT NULL, client_id TEXT NOT NULL, '
      'first INTEGER NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (split, client_id)) '
      'WITHOUT ROWID'
    )
    # An append-only rowid table numbers its rows 1, 2, ...: a client's records are a range.
    first = 1
    for split, client_id, records in clients:
      records = list(records)
      count = len(records)
      db.executemany('INSERT INTO scratch_records (record) VALUES (?)', ((r,) for r in records))
      try:
        db.execute(
          'INSERT INTO scratch_clients VALUES (?, ?, ?, ?)', (split, client_id, first, count)
        )
      except sqlite3.IntegrityError as e:
        raise ClientStoreError(
          f'client {client_id!r} of split {split!r} comes twice in the clients for {path!r}; '
          'each client is written once, with all its records.'
        ) from e
      counts.setdefault(split, {})[client_id] = count
      first += count
    db.execute('COMMIT')

    def rows() -> Iterator[Row]:
      # The primary key orders the clients; each client's records are one rowid range.
      for split, client_id, start, n in db.execute(
        'SELECT split, client_id, first, count FROM scratch_clients ORDER BY split, client_id'
      ):
        reads = db.execute(
          'SELECT record FROM scratch_records WHERE rowid >= ? AND rowid < ? ORDER BY rowid',
          (start, start + n),
        )
        for seq, (record,) in enumerate(reads):
          yield split, client_id, seq, record

    write_store(path, rows())
  finally:
    db.close()
    with contextlib.suppress(FileNotFoundError):
      os.remove(scratch)
  return counts


@contextlib.contextmanager
def _open_for_reading(path: str) -> Iterator[sqlite3.Connection]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found')
  db = sqlite3.connect(reader_uri(path), uri=True)
  try:
    yield db
  finally:
    db.close()


def read_client(path: str, split: str, client_id: str) -> list[bytes]:
  """One client's records from the file at `path`, in order (for tools and tests).

  Raises:
    ClientStoreError: For an unknown split.
    FileNotFoundError: If `path` does not exist.
  """
  _check_split(split)
  with _open_for_reading(path) as db:
    return [
      bytes(r)
      for (r,) in db.execute(
        f'SELECT record FROM {TABLE} WHERE split = ? AND client_id = ? ORDER BY seq',
        (split, client_id),
      )
    ]


def client_counts(path: str) -> dict[str, dict[str, int]]:
  """Split -> client id -> number of records, of the file at `path`.

  Raises:
    FileNotFoundError: If `path` does not exist.
  """
  out: dict[str, dict[str, int]] = {}
  with _open_for_reading(path) as db:
    query = f'SELECT split, client_id, COUNT(*) FROM {TABLE} GROUP BY split, client_id'
    for split, client_id, count in db.execute(query):
      out.setdefault(split, {})[client_id] = count
  return out


def rows_of_clients(
  clients: Mapping[str, Mapping[str, Sequence[bytes]]],
) -> Iterator[Row]:
  """The rows of split -> client id -> records, in key order (as `write_store` takes them)."""
  for split in sorted(clients):
    for client_id, records in sorted(clients[split].items()):
      for seq, record in enumerate(records):
        yield split, client_id, seq, record
