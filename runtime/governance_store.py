"""A silo's durable governance state: studies, their round budgets, the audit log.

One SQLite database (`<state_dir>/governance.sqlite`, WAL mode) shared by the
silo server and the data owner's `fedpipe-governance` command:

* `studies`: each submitted request, its status (pending, approved,
  rejected), the rounds approved and the rounds used;
* `computations`: the fingerprints each study may run, and their role;
* `audit`: one row per event (submission, decision, executed or refused
  computation). Triggers abort any UPDATE or DELETE on it, so the server's
  own code cannot rewrite history; each row also carries a SHA-256 chain over
  its predecessor, so an edit made by other means (dropping the triggers, or
  editing the file) is detected by `verify_audit`.

A round is charged to its study in the same transaction that records it,
before the computation runs: a round that fails afterwards still counts, as
its data was touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Optional

DB_FILENAME = 'governance.sqlite'
PENDING, APPROVED, REJECTED = 'pending', 'approved', 'rejected'
_GENESIS = '0' * 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
  study_id TEXT PRIMARY KEY,
  caller TEXT NOT NULL,
  name TEXT NOT NULL,
  status TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'rejected')),
  submitted_at REAL NOT NULL,
  decided_at REAL,
  reason TEXT,
  request TEXT NOT NULL,
  review TEXT NOT NULL,
  rounds_approved INTEGER NOT NULL DEFAULT 0,
  rounds_used INTEGER NOT NULL DEFAULT 0 CHECK (rounds_used >= 0)
);
CREATE TABLE IF NOT EXISTS computations (
  fingerprint TEXT NOT NULL,
  study_id TEXT NOT NULL REFERENCES studies(study_id),
  role TEXT NOT NULL,
  PRIMARY KEY (fingerprint, study_id)
);
CREATE TABLE IF NOT EXISTS audit (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  time REAL NOT NULL,
  event TEXT NOT NULL,
  caller TEXT,
  study_id TEXT,
  fingerprint TEXT,
  detail TEXT NOT NULL,
  prev_hash TEXT NOT NULL,
  entry_hash TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


class GovernanceError(RuntimeError):
  """A governance operation cannot be done; the message says why and what to do."""


class BudgetExhaustedError(GovernanceError):
  """The study has used every round it was approved for."""


@dataclasses.dataclass(frozen=True)
class Study:
  """A stored study request and its state."""

  study_id: str
  caller: str
  name: str
  status: str
  submitted_at: float
  decided_at: Optional[float]
  reason: Optional[str]
  request: dict[str, Any]
  review: dict[str, Any]
  rounds_approved: int
  rounds_used: int

  @property
  def rounds_remaining(self) -> int:
    return max(self.rounds_approved - self.rounds_used, 0)

  def summary(self) -> dict[str, Any]:
    """The status a coordinator is told (no request body)."""
    return {
        'study_id': self.study_id, 'name': self.name, 'status': self.status,
        'reason': self.reason, 'rounds_approved': self.rounds_approved,
        'rounds_used': self.rounds_used, 'rounds_remaining': self.rounds_remaining,
        'violations': self.review.get('violations', []),
    }


@dataclasses.dataclass(frozen=True)
class AuditEntry:
  seq: int
  time: float
  event: str
  caller: Optional[str]
  study_id: Optional[str]
  fingerprint: Optional[str]
  detail: dict[str, Any]


def _entry_hash(prev_hash: str, row: dict[str, Any]) -> str:
  body = json.dumps(row, sort_keys=True, separators=(',', ':'))
  return hashlib.sha256((prev_hash + body).encode()).hexdigest()


class GovernanceStore:
  """Thread-safe access to the governance database of one silo."""

  def __init__(self, state_dir: str):
    """Opens (creating if needed) `<state_dir>/governance.sqlite`.

    Raises:
      GovernanceError: If the directory or database cannot be used.
    """
    self.path = os.path.join(state_dir, DB_FILENAME)
    try:
      os.makedirs(state_dir, mode=0o700, exist_ok=True)
      self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                 check_same_thread=False)
      self._db.execute('PRAGMA journal_mode=WAL')
      self._db.execute('PRAGMA foreign_keys=ON')
      self._db.executescript(_SCHEMA)
    except (OSError, sqlite3.Error) as e:
      raise GovernanceError(f'cannot open governance state {self.path!r}: {e}') from e
    self._lock = threading.Lock()

  def close(self) -> None:
    self._db.close()

  @contextlib.contextmanager
  def _transaction(self) -> Iterator[sqlite3.Connection]:
    with self._lock:
      self._db.execute('BEGIN IMMEDIATE')
      try:
        yield self._db
      except BaseException:
        self._db.execute('ROLLBACK')
        raise
      self._db.execute('COMMIT')

  def _append_audit(self, db: sqlite3.Connection, event: str, *, caller: Optional[str] = None,
                    study_id: Optional[str] = None, fingerprint: Optional[str] = None,
                    detail: Optional[dict[str, Any]] = None) -> None:
    last = db.execute('SELECT entry_hash FROM audit ORDER BY seq DESC LIMIT 1').fetchone()
    prev_hash = last[0] if last else _GENESIS
    row = {'time': time.time(), 'event': event, 'caller': caller, 'study_id': study_id,
           'fingerprint': fingerprint, 'detail': json.dumps(detail or {}, sort_keys=True)}
    db.execute(
        'INSERT INTO audit (time, event, caller, study_id, fingerprint, detail, prev_hash,'
        ' entry_hash) VALUES (:time, :event, :caller, :study_id, :fingerprint, :detail,'
        ' :prev_hash, :entry_hash)',
        dict(row, prev_hash=prev_hash, entry_hash=_entry_hash(prev_hash, row)))

  def record(self, event: str, **fields) -> None:
    """Appends one audit entry (see `_append_audit` for the fields)."""
    with self._transaction() as db:
      self._append_audit(db, event, **fields)

  # Studies.

  def submit(self, *, study_id: str, caller: str, name: str, request: dict[str, Any],
             review: dict[str, Any], roles: dict[str, str]) -> Study:
    """Stores a new pending study, or returns the stored one with this id."""
    with self._transaction() as db:
      existing = self._get(db, study_id)
      if existing is not None:
        return existing
      db.execute(
          'INSERT INTO studies (study_id, caller, name, status, submitted_at, request, review)'
          ' VALUES (?, ?, ?, ?, ?, ?, ?)',
          (study_id, caller, name, PENDING, time.time(), json.dumps(request),
           json.dumps(review)))
      db.executemany('INSERT INTO computations (fingerprint, study_id, role) VALUES (?, ?, ?)',
                     [(fp, study_id, role) for fp, role in roles.items()])
      self._append_audit(db, 'study_submitted', caller=caller, study_id=study_id,
                         detail={'name': name, 'computations': roles,
                                 'violations': review.get('violations', [])})
      return self._get(db, study_id)

  @staticmethod
  def _select(db: sqlite3.Connection, where: str, params: tuple) -> list[Study]:
    rows = db.execute(
        'SELECT study_id, caller, name, status, submitted_at, decided_at, reason, request,'
        f' review, rounds_approved, rounds_used FROM studies WHERE {where}'
        ' ORDER BY submitted_at', params).fetchall()
    return [Study(*r[:7], json.loads(r[7]), json.loads(r[8]), r[9], r[10]) for r in rows]

  def _get(self, db: sqlite3.Connection, study_id: str) -> Optional[Study]:
    found = self._select(db, 'study_id = ?', (study_id,))
    return found[0] if found else None

  def get(self, study_id: str) -> Optional[Study]:
    with self._lock:
      return self._get(self._db, study_id)

  def find(self, prefix: str) -> Study:
    """The study whose id starts with `prefix`.

    Raises:
      GovernanceError: If none or several match.
    """
    with self._lock:
      found = self._select(self._db, "study_id LIKE ? || '%'", (prefix,))
    if not found:
      raise GovernanceError(f'no study with id {prefix!r}; `list` shows the studies')
    if len(found) > 1:
      raise GovernanceError(
          f'study id {prefix!r} is ambiguous: {", ".join(s.study_id for s in found)}')
    return found[0]

  def studies(self, status: Optional[str] = None) -> list[Study]:
    with self._lock:
      return self._select(self._db, '(? IS NULL OR status = ?)', (status, status))

  def decide(self, study_id: str, *, approve: bool, rounds: int = 0, reason: str = '',
             decided_by: str = 'data owner') -> Study:
    """Approves (for `rounds` rounds) or rejects a pending study.

    Raises:
      GovernanceError: If the study is unknown or already decided.
    """
    with self._transaction() as db:
      study = self._get(db, study_id)
      if study is None:
        raise GovernanceError(f'no study {study_id!r}')
      if study.status != PENDING:
        raise GovernanceError(f'study {study_id} is already {study.status}')
      status = APPROVED if approve else REJECTED
      db.execute('UPDATE studies SET status = ?, decided_at = ?, reason = ?, rounds_approved = ?'
                 ' WHERE study_id = ?',
                 (status, time.time(), reason or None, rounds if approve else 0, study_id))
      self._append_audit(db, f'study_{status}', caller=decided_by, study_id=study_id,
                         detail={'rounds_approved': rounds if approve else 0, 'reason': reason})
      return self._get(db, study_id)

  def approved_computations(self, caller: str) -> dict[str, tuple[str, str]]:
    """Fingerprint -> (study id, role) of every study approved for `caller`."""
    with self._lock:
      rows = self._db.execute(
          'SELECT c.fingerprint, c.study_id, c.role FROM computations c JOIN studies s'
          ' ON s.study_id = c.study_id WHERE s.status = ? AND s.caller = ?'
          ' ORDER BY s.decided_at', (APPROVED, caller)).fetchall()
    return {fp: (study, role) for fp, study, role in rows}

  def studies_with(self, fingerprint: str) -> list[Study]:
    with self._lock:
      return self._select(
          self._db, 'study_id IN (SELECT study_id FROM computations WHERE fingerprint = ?)',
          (fingerprint,))

  def charge_round(self, study_id: str, *, caller: str, fingerprint: str,
                   clients: Sequence[str]) -> int:
    """Charges one round to the study and audits it, atomically.

    Returns:
      The round's number within the study (1-based).

    Raises:
      BudgetExhaustedError: If no approved round is left (audited as refused).
    """
    with self._transaction() as db:
      updated = db.execute(
          'UPDATE studies SET rounds_used = rounds_used + 1 WHERE study_id = ? AND status = ?'
          ' AND rounds_used < rounds_approved', (study_id, APPROVED)).rowcount
      study = self._get(db, study_id)
      if not updated:
        self._append_audit(db, 'refused', caller=caller, study_id=study_id,
                           fingerprint=fingerprint,
                           detail={'reason': 'round budget exhausted', 'clients': list(clients)})
      else:
        self._append_audit(db, 'executed', caller=caller, study_id=study_id,
                           fingerprint=fingerprint,
                           detail={'role': 'train_round', 'round': study.rounds_used,
                                   'clients': list(clients)})
    if not updated:
      raise BudgetExhaustedError(
          f'study {study_id} has used all {study.rounds_approved} approved rounds; '
          'submit a new study for more')
    return study.rounds_used

  # Audit.

  def audit(self, *, study_id: Optional[str] = None) -> list[AuditEntry]:
    with self._lock:
      rows = self._db.execute(
          'SELECT seq, time, event, caller, study_id, fingerprint, detail FROM audit'
          ' WHERE (? IS NULL OR study_id = ?) ORDER BY seq', (study_id, study_id)).fetchall()
    return [AuditEntry(*r[:6], json.loads(r[6])) for r in rows]

  def verify_audit(self) -> Optional[str]:
    """None if the hash chain is intact, else where it breaks."""
    with self._lock:
      rows = self._db.execute(
          'SELECT seq, time, event, caller, study_id, fingerprint, detail, prev_hash,'
          ' entry_hash FROM audit ORDER BY seq').fetchall()
    prev = _GENESIS
    for seq, t, event, caller, study_id, fp, detail, prev_hash, entry_hash in rows:
      row = {'time': t, 'event': event, 'caller': caller, 'study_id': study_id,
             'fingerprint': fp, 'detail': detail}
      if prev_hash != prev:
        return f'entry {seq}: it does not follow the entry before it (an entry was removed)'
      if _entry_hash(prev_hash, row) != entry_hash:
        return f'entry {seq}: its content does not match its hash (it was modified)'
      prev = entry_hash
    return None
