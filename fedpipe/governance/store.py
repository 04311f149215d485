"""A silo's durable governance state: studies, their call budgets, the audit log.

One SQLite database (`<state_dir>/governance.sqlite`, WAL mode) shared by the
silo server and the data owner's `fedpipe-governance` command:

* `studies`: each submitted request, its status (pending, approved,
  rejected), and how many training rounds and evaluations were approved and
  used;
* `computations`: the fingerprints each study may run, and their role;
* `audit`: one row per event (submission, decision, extension, executed or
  refused computation). Triggers abort any UPDATE or DELETE on it; each row
  carries a SHA-256 chain over its predecessor.

The audit log is the record; the `studies` and `computations` tables are a
cache of it. Every count (approved, used) and every role is derived from the
log again on every charge and at start-up (`verify`), and a table that
disagrees with the log is reported as tampered. The head of the chain is
anchored outside the database: each entry's sequence number and hash are
appended to `<state_dir>/audit.anchor` (opened append-only, fsynced) while
the database's write lock is held, before the entry is committed. So

* an entry edited in place breaks the chain;
* an entry deleted from the tail, or the log re-chained after an edit, no
  longer matches the anchor;
* an entry inserted by other means has no anchor line;
* a budget edited in `studies` no longer matches the log.

What this cannot detect: someone who can write both the database and the
anchor file (root on the silo's host) and rewrites both consistently. A
crash in the microseconds between the anchor's fsync and the commit leaves
an anchored entry missing from the database, reported like a deleted one.
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
from typing import Any

from fedpipe.errors import FedpipeError

DB_FILENAME = 'governance.sqlite'
ANCHOR_FILENAME = 'audit.anchor'
PENDING, APPROVED, REJECTED = 'pending', 'approved', 'rejected'
ROLE_TRAIN, ROLE_EVALUATE = 'train_round', 'evaluate'
# A statistics study's one "computation" is its query (fingerprint `statistics:<sha256>`);
# its releases are counted as its rounds.
ROLE_STATISTICS = 'statistics'
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
  rounds_used INTEGER NOT NULL DEFAULT 0 CHECK (rounds_used >= 0),
  evaluations_approved INTEGER NOT NULL DEFAULT 0,
  evaluations_used INTEGER NOT NULL DEFAULT 0 CHECK (evaluations_used >= 0)
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
CREATE INDEX IF NOT EXISTS audit_by_study ON audit (study_id, seq);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""
_COUNTERS = ('rounds_approved', 'rounds_used', 'evaluations_approved', 'evaluations_used')
_USED = {
  ROLE_TRAIN: 'rounds_used',
  ROLE_EVALUATE: 'evaluations_used',
  ROLE_STATISTICS: 'rounds_used',
}
_APPROVED = {
  ROLE_TRAIN: 'rounds_approved',
  ROLE_EVALUATE: 'evaluations_approved',
  ROLE_STATISTICS: 'rounds_approved',
}
_BUDGET_NAMES = {ROLE_TRAIN: 'rounds', ROLE_EVALUATE: 'evaluations', ROLE_STATISTICS: 'releases'}
_EXTEND_FLAGS = {ROLE_TRAIN: 'rounds', ROLE_EVALUATE: 'evaluations', ROLE_STATISTICS: 'rounds'}


class GovernanceError(FedpipeError, RuntimeError):
  """A governance operation cannot be done; the message says why and what to do."""


class BudgetExhaustedError(GovernanceError):
  """The study has used every call of this kind it was approved for."""


class TamperedError(GovernanceError):
  """The governance state disagrees with its audit log or the log with its anchor."""


class UnknownStudyError(FedpipeError, LookupError):
  """No study with that id was submitted (by the caller who asks)."""


@dataclasses.dataclass(frozen=True)
class Study:
  """A stored study request and its state."""

  study_id: str
  caller: str
  name: str
  status: str
  submitted_at: float
  decided_at: float | None
  reason: str | None
  request: dict[str, Any]
  review: dict[str, Any]
  rounds_approved: int
  rounds_used: int
  evaluations_approved: int = 0
  evaluations_used: int = 0

  @property
  def rounds_remaining(self) -> int:
    return max(self.rounds_approved - self.rounds_used, 0)

  @property
  def evaluations_remaining(self) -> int:
    return max(self.evaluations_approved - self.evaluations_used, 0)

  @property
  def violations(self) -> list[str]:
    """How the study breaks the silo's policy, as reviewed at submission (empty: it fits)."""
    return list(self.review.get('violations', []))


@dataclasses.dataclass(frozen=True)
class AuditEntry:
  seq: int
  time: float
  event: str
  caller: str | None
  study_id: str | None
  fingerprint: str | None
  detail: dict[str, Any]


def _entry_hash(prev_hash: str, row: dict[str, Any]) -> str:
  body = json.dumps(row, sort_keys=True, separators=(',', ':'))
  return hashlib.sha256((prev_hash + body).encode()).hexdigest()


def _derive(entries: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
  """A study's status, roles and counters as its audit entries record them."""
  state: dict[str, Any] = dict.fromkeys(_COUNTERS, 0)
  state.update(status=None, roles={}, privacy=None)
  for event, detail in entries:
    if event == 'study_submitted':
      state['status'] = PENDING
      state['roles'] = dict(detail.get('computations', {}))
      state['privacy'] = detail.get('privacy')
    elif event in ('study_approved', 'study_rejected'):
      state['status'] = APPROVED if event == 'study_approved' else REJECTED
      state['rounds_approved'] = int(detail.get('rounds_approved', 0))
      state['evaluations_approved'] = int(detail.get('evaluations_approved', 0))
    elif event == 'study_extended':
      state['rounds_approved'] = int(detail['rounds_approved'])
      state['evaluations_approved'] = int(detail['evaluations_approved'])
    elif event == 'executed' and detail.get('role') in _USED:
      state[_USED[detail['role']]] += 1
  return state


class GovernanceStore:
  """Thread-safe access to the governance database of one silo."""

  def __init__(self, state_dir: str):
    """Opens (creating if needed) `<state_dir>/governance.sqlite` and its anchor.

    Raises:
      GovernanceError: If the directory or database cannot be used.
    """
    self.path = os.path.join(state_dir, DB_FILENAME)
    self.anchor_path = os.path.join(state_dir, ANCHOR_FILENAME)
    try:
      os.makedirs(state_dir, mode=0o700, exist_ok=True)
      self._db = sqlite3.connect(
        self.path, timeout=30.0, isolation_level=None, check_same_thread=False
      )
      self._db.execute('PRAGMA journal_mode=WAL')
      self._db.execute('PRAGMA foreign_keys=ON')
      self._db.executescript(_SCHEMA)
      columns = {r[1] for r in self._db.execute('PRAGMA table_info(studies)')}
    except (OSError, sqlite3.Error) as e:
      raise GovernanceError(f'cannot open governance state {self.path!r}: {e}') from e
    if 'evaluations_approved' not in columns:
      raise GovernanceError(
        f'{self.path} was written by an older fedpipe (no evaluation budgets); keep it as '
        'a record and start this silo with a new --state_dir'
      )
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

  def _append_audit(
    self,
    db: sqlite3.Connection,
    event: str,
    *,
    caller: str | None = None,
    study_id: str | None = None,
    fingerprint: str | None = None,
    detail: dict[str, Any] | None = None,
  ) -> None:
    last = db.execute('SELECT entry_hash FROM audit ORDER BY seq DESC LIMIT 1').fetchone()
    prev_hash = last[0] if last else _GENESIS
    row = {
      'time': time.time(),
      'event': event,
      'caller': caller,
      'study_id': study_id,
      'fingerprint': fingerprint,
      'detail': json.dumps(detail or {}, sort_keys=True),
    }
    entry_hash = _entry_hash(prev_hash, row)
    seq = db.execute(
      'INSERT INTO audit (time, event, caller, study_id, fingerprint, detail, prev_hash,'
      ' entry_hash) VALUES (:time, :event, :caller, :study_id, :fingerprint, :detail,'
      ' :prev_hash, :entry_hash)',
      dict(row, prev_hash=prev_hash, entry_hash=entry_hash),
    ).lastrowid
    # Anchored under the database's write lock, before the commit: anchor
    # lines are in log order, and an entry without one was not written here.
    self._anchor(seq, entry_hash)

  def _anchor(self, seq: int, entry_hash: str) -> None:
    fd = os.open(self.anchor_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
      os.write(fd, f'{seq} {entry_hash}\n'.encode())
      os.fsync(fd)
    finally:
      os.close(fd)

  def record(self, event: str, **fields) -> None:
    """Appends one audit entry (see `_append_audit` for the fields)."""
    with self._transaction() as db:
      self._append_audit(db, event, **fields)

  # Studies.

  def submit(
    self,
    *,
    study_id: str,
    caller: str,
    name: str,
    request: dict[str, Any],
    review: dict[str, Any],
    roles: dict[str, str],
  ) -> Study:
    """Stores a new pending study, or returns the stored one with this id."""
    with self._transaction() as db:
      existing = self._get(db, study_id)
      if existing is not None:
        return existing
      db.execute(
        'INSERT INTO studies (study_id, caller, name, status, submitted_at, request, review)'
        ' VALUES (?, ?, ?, ?, ?, ?, ?)',
        (study_id, caller, name, PENDING, time.time(), json.dumps(request), json.dumps(review)),
      )
      db.executemany(
        'INSERT INTO computations (fingerprint, study_id, role) VALUES (?, ?, ?)',
        [(fp, study_id, role) for fp, role in roles.items()],
      )
      self._append_audit(
        db,
        'study_submitted',
        caller=caller,
        study_id=study_id,
        detail={
          'name': name,
          'computations': roles,
          'privacy': request.get('privacy'),
          'violations': review.get('violations', []),
        },
      )
      return self._get(db, study_id)

  @staticmethod
  def _select(db: sqlite3.Connection, where: str, params: tuple) -> list[Study]:
    rows = db.execute(
      'SELECT study_id, caller, name, status, submitted_at, decided_at, reason, request,'
      ' review, rounds_approved, rounds_used, evaluations_approved, evaluations_used'
      f' FROM studies WHERE {where} ORDER BY submitted_at',
      params,
    ).fetchall()
    return [Study(*r[:7], json.loads(r[7]), json.loads(r[8]), *r[9:]) for r in rows]

  def _get(self, db: sqlite3.Connection, study_id: str) -> Study | None:
    found = self._select(db, 'study_id = ?', (study_id,))
    return found[0] if found else None

  def get(self, study_id: str) -> Study | None:
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
        f'study id {prefix!r} is ambiguous: {", ".join(s.study_id for s in found)}'
      )
    return found[0]

  def studies(self, status: str | None = None) -> list[Study]:
    with self._lock:
      return self._select(self._db, '(? IS NULL OR status = ?)', (status, status))

  def decide(
    self,
    study_id: str,
    *,
    approve: bool,
    rounds: int = 0,
    evaluations: int = 0,
    reason: str = '',
    decided_by: str = 'data owner',
  ) -> Study:
    """Approves (for `rounds` rounds and `evaluations` evaluations) or rejects a pending study.

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
      rounds, evaluations = (rounds, evaluations) if approve else (0, 0)
      db.execute(
        'UPDATE studies SET status = ?, decided_at = ?, reason = ?, rounds_approved = ?,'
        ' evaluations_approved = ? WHERE study_id = ?',
        (status, time.time(), reason or None, rounds, evaluations, study_id),
      )
      self._append_audit(
        db,
        f'study_{status}',
        caller=decided_by,
        study_id=study_id,
        detail={'rounds_approved': rounds, 'evaluations_approved': evaluations, 'reason': reason},
      )
      return self._get(db, study_id)

  def claim_secure_round(
    self, study_id: str, round_number: int, attempt: int, roster: Sequence[str], caller: str
  ) -> None:
    """Records that this silo makes keys for (round, attempt) of a secure study.

    The audit log is the record, so a restarted silo still never makes keys
    twice for a round, nor for one older than any it keyed.

    Raises:
      GovernanceError: If (round, attempt) is not newer than the study's newest.
    """
    with self._transaction() as db:
      row = db.execute(
        "SELECT detail FROM audit WHERE study_id = ? AND event = 'secure_round_keyed' "
        'ORDER BY seq DESC LIMIT 1',
        (study_id,),
      ).fetchone()
      if row is not None:
        newest = json.loads(row[0])
        if (round_number, attempt) <= (newest['round'], newest['attempt']):
          raise GovernanceError(
            f'round {round_number} attempt {attempt} of study {study_id} is not newer than '
            f'round {newest["round"]} attempt {newest["attempt"]}: keys are never made twice'
          )
      self._append_audit(
        db,
        'secure_round_keyed',
        caller=caller,
        study_id=study_id,
        detail={'round': round_number, 'attempt': attempt, 'roster': list(roster)},
      )

  def extend(
    self, study_id: str, *, rounds: int = 0, evaluations: int = 0, decided_by: str = 'data owner'
  ) -> Study:
    """Adds rounds and evaluations to an approved study.

    Raises:
      GovernanceError: If the study is not approved or nothing is added.
    """
    if rounds < 0 or evaluations < 0 or rounds + evaluations == 0:
      raise GovernanceError(
        'extend adds at least one round or evaluation (--rounds, '
        '--evaluations), and never takes any away'
      )
    with self._transaction() as db:
      study = self._get(db, study_id)
      if study is None or study.status != APPROVED:
        raise GovernanceError(
          f'study {study_id} is {study.status if study else "unknown"}; '
          'only an approved study can be extended'
        )
      self._check_consistent(db, study)
      db.execute(
        'UPDATE studies SET rounds_approved = rounds_approved + ?,'
        ' evaluations_approved = evaluations_approved + ? WHERE study_id = ?',
        (rounds, evaluations, study_id),
      )
      study = self._get(db, study_id)
      self._append_audit(
        db,
        'study_extended',
        caller=decided_by,
        study_id=study_id,
        detail={
          'rounds_added': rounds,
          'evaluations_added': evaluations,
          'rounds_approved': study.rounds_approved,
          'evaluations_approved': study.evaluations_approved,
        },
      )
      return study

  def approved_computations(self, caller: str) -> dict[str, list[tuple[str, str]]]:
    """Fingerprint -> [(study id, role)] over the studies approved for `caller`, oldest first."""
    with self._lock:
      rows = self._db.execute(
        'SELECT c.fingerprint, c.study_id, c.role FROM computations c JOIN studies s'
        ' ON s.study_id = c.study_id WHERE s.status = ? AND s.caller = ?'
        ' ORDER BY s.decided_at',
        (APPROVED, caller),
      ).fetchall()
    found: dict[str, list[tuple[str, str]]] = {}
    for fp, study, role in rows:
      found.setdefault(fp, []).append((study, role))
    return found

  def roles_of(self, fingerprints: Sequence[str]) -> dict[str, set[tuple[str, str]]]:
    """Fingerprint -> {(study id, role)} in every study that holds it."""
    with self._lock:
      rows = self._db.execute(
        'SELECT fingerprint, study_id, role FROM computations WHERE fingerprint IN'
        f' ({",".join("?" * len(fingerprints))})',
        tuple(fingerprints),
      ).fetchall()
    found: dict[str, set[tuple[str, str]]] = {}
    for fp, study, role in rows:
      found.setdefault(fp, set()).add((study, role))
    return found

  def ledger(self) -> list[dict[str, Any]]:
    """Approved studies' privacy parameters and rounds (approved, used), without the request."""
    with self._lock:
      rows = self._db.execute(
        "SELECT study_id, rounds_approved, rounds_used, json_extract(request, '$.privacy')"
        ' FROM studies WHERE status = ? ORDER BY decided_at',
        (APPROVED,),
      ).fetchall()
    return [
      {'study_id': r[0], 'rounds_approved': r[1], 'rounds_used': r[2], 'privacy': json.loads(r[3])}
      for r in rows
    ]

  def studies_with(self, fingerprint: str) -> list[Study]:
    with self._lock:
      return self._select(
        self._db,
        'study_id IN (SELECT study_id FROM computations WHERE fingerprint = ?)',
        (fingerprint,),
      )

  # Charges.

  def _derived(self, db: sqlite3.Connection, study_id: str) -> dict[str, Any]:
    rows = db.execute(
      'SELECT event, detail FROM audit WHERE study_id = ? ORDER BY seq', (study_id,)
    ).fetchall()
    return _derive([(event, json.loads(detail)) for event, detail in rows])

  def _inconsistencies(self, db: sqlite3.Connection, study: Study) -> list[str]:
    derived = self._derived(db, study.study_id)
    found = [
      f'study {study.study_id}: {name} is {getattr(study, name)} in the studies table '
      f'but {derived[name]} in the audit log'
      for name in _COUNTERS
      if getattr(study, name) != derived[name]
    ]
    if study.status != derived['status']:
      found.append(
        f'study {study.study_id}: status is {study.status} in the studies table '
        f'but {derived["status"]} in the audit log'
      )
    roles = dict(
      db.execute(
        'SELECT fingerprint, role FROM computations WHERE study_id = ?', (study.study_id,)
      ).fetchall()
    )
    if roles != derived['roles']:
      found.append(
        f'study {study.study_id}: its computations or their roles differ from '
        'those recorded at submission'
      )
    if study.request.get('privacy') != derived['privacy']:
      found.append(
        f'study {study.study_id}: its privacy parameters differ from those recorded at submission'
      )
    return found

  def _check_consistent(self, db: sqlite3.Connection, study: Study) -> None:
    found = self._inconsistencies(db, study)
    if found:
      raise TamperedError(
        'governance state TAMPERED: '
        + '; '.join(found)
        + '. Nothing more runs for this study; see `fedpipe-governance '
        'audit --verify`'
      )

  def charge(
    self,
    study_id: str,
    *,
    fingerprint: str,
    caller: str,
    clients: Sequence[str],
    detail: dict[str, Any] | None = None,
  ) -> Study:
    """Charges one call of the study's computation `fingerprint` and audits it, atomically.

    The computation's role (and so which budget pays) is the one recorded
    when the study was submitted, and the counts are checked against the
    audit log first.

    Returns:
      The study after the charge.

    Raises:
      BudgetExhaustedError: If no approved call of this role is left (audited
        as refused).
      TamperedError: If the study's state disagrees with its audit log.
    """
    with self._transaction() as db:
      study = self._get(db, study_id)
      if study is None or study.status != APPROVED:
        raise GovernanceError(f'study {study_id} is not approved')
      self._check_consistent(db, study)
      role = db.execute(
        'SELECT role FROM computations WHERE study_id = ? AND fingerprint = ?',
        (study_id, fingerprint),
      ).fetchone()
      if role is None:
        raise GovernanceError(f'study {study_id} has no computation {fingerprint}')
      role = role[0]
      used, approved = getattr(study, _USED[role]), getattr(study, _APPROVED[role])
      if used >= approved:
        kind = _BUDGET_NAMES[role]
        self._append_audit(
          db,
          'refused',
          caller=caller,
          study_id=study_id,
          fingerprint=fingerprint,
          detail={'reason': f'{kind} budget exhausted', 'role': role, 'clients': list(clients)},
        )
        error = BudgetExhaustedError(
          f'study {study_id} has used all {approved} approved {kind}; its data owner can '
          f'add more with `fedpipe-governance extend {study_id} --{_EXTEND_FLAGS[role]}=N`'
        )
      else:
        db.execute(
          f'UPDATE studies SET {_USED[role]} = {_USED[role]} + 1 WHERE study_id = ?', (study_id,)
        )
        self._append_audit(
          db,
          'executed',
          caller=caller,
          study_id=study_id,
          fingerprint=fingerprint,
          detail=dict(detail or {}, role=role, call=used + 1, clients=list(clients)),
        )
        return self._get(db, study_id)
    raise error

  # Audit.

  def audit(self, *, study_id: str | None = None) -> list[AuditEntry]:
    with self._lock:
      rows = self._db.execute(
        'SELECT seq, time, event, caller, study_id, fingerprint, detail FROM audit'
        ' WHERE (? IS NULL OR study_id = ?) ORDER BY seq',
        (study_id, study_id),
      ).fetchall()
    return [AuditEntry(*r[:6], json.loads(r[6])) for r in rows]

  def _read_anchor(self) -> tuple[dict[int, str], list[str]]:
    anchors, problems = {}, []
    try:
      with open(self.anchor_path, encoding='utf-8') as f:
        lines = f.read().splitlines()
    except FileNotFoundError:
      return {}, []
    for number, line in enumerate(lines, 1):
      seq, _, entry_hash = line.partition(' ')
      if not seq.isdigit() or len(entry_hash) != 64:
        problems.append(f'anchor line {number} is malformed')
        continue
      anchors[int(seq)] = entry_hash
    return anchors, problems

  def verify_audit(self) -> list[str]:
    """Every way the log breaks its chain or its anchor (empty: intact)."""
    with self._lock:
      rows = self._db.execute(
        'SELECT seq, time, event, caller, study_id, fingerprint, detail, prev_hash,'
        ' entry_hash FROM audit ORDER BY seq'
      ).fetchall()
    problems = []
    prev = _GENESIS
    for seq, t, event, caller, study_id, fp, detail, prev_hash, entry_hash in rows:
      row = {
        'time': t,
        'event': event,
        'caller': caller,
        'study_id': study_id,
        'fingerprint': fp,
        'detail': detail,
      }
      if prev_hash != prev:
        problems.append(
          f'entry {seq}: it does not follow the entry before it (an entry was removed)'
        )
        break
      if _entry_hash(prev_hash, row) != entry_hash:
        problems.append(f'entry {seq}: its content does not match its hash (it was modified)')
        break
      prev = entry_hash
    anchors, anchor_problems = self._read_anchor()
    problems += anchor_problems
    if rows and not anchors and not os.path.exists(self.anchor_path):
      problems.append(f'the anchor file {self.anchor_path} is missing')
      return problems
    logged = {seq: entry_hash for seq, *_, entry_hash in rows}
    for seq, entry_hash in sorted(anchors.items()):
      if seq not in logged:
        problems.append(f'entry {seq} is anchored but missing from the log (entries were deleted)')
        break
      if logged[seq] != entry_hash:
        problems.append(
          f'entry {seq} differs from its anchored hash (the log was rewritten and re-chained)'
        )
        break
    unanchored = sorted(set(logged) - set(anchors))
    if unanchored:
      problems.append(
        f'{len(unanchored)} entr{"y" if len(unanchored) == 1 else "ies"} '
        f'(from {unanchored[0]}) have no anchor: written to the log by other '
        'means'
      )
    return problems

  def verify(self) -> list[str]:
    """The audit log's problems, then every study whose state disagrees with the log."""
    problems = self.verify_audit()
    with self._lock:
      for study in self._select(self._db, '1', ()):
        problems += self._inconsistencies(self._db, study)
    return problems
