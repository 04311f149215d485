"""The governance store alone: append-only log, its anchor, budgets derived from it."""

import os
import sqlite3

import pytest

from fedpipe.governance import store as governance_store
from tests.conftest import tamper_governance_db


def _study(store, study_id='s1', role='train_round'):
  return store.submit(
    study_id=study_id,
    caller='coordinator',
    name=study_id,
    request={'privacy': {'noise_multiplier': 1.0}},
    review={},
    roles={f'sha256:{study_id}': role},
  )


def test_charges_follow_the_role_recorded_at_submission_and_the_approved_counts(tmp_path):
  store = governance_store.GovernanceStore(str(tmp_path))
  _study(store)
  with pytest.raises(governance_store.GovernanceError, match='not approved'):
    store.charge('s1', fingerprint='sha256:s1', caller='coordinator', clients=['a'])
  store.decide('s1', approve=True, rounds=2, evaluations=0)
  for call in (1, 2):
    study = store.charge(
      's1',
      fingerprint='sha256:s1',
      caller='coordinator',
      clients=['a'],
      detail={'epsilon': 0.1 * call},
    )
    assert study.rounds_used == call and study.evaluations_used == 0
  with pytest.raises(
    governance_store.BudgetExhaustedError, match='used all 2 approved rounds.*extend s1 --rounds=N'
  ):
    store.charge('s1', fingerprint='sha256:s1', caller='coordinator', clients=['a'])
  study = store.extend('s1', rounds=1)
  assert (study.rounds_approved, study.rounds_used) == (3, 2)
  store.charge('s1', fingerprint='sha256:s1', caller='coordinator', clients=['a'])
  with pytest.raises(governance_store.GovernanceError, match='never takes any away'):
    store.extend('s1', rounds=0)
  events = [e.event for e in store.audit()]
  assert events == [
    'study_submitted',
    'study_approved',
    'executed',
    'executed',
    'refused',
    'study_extended',
    'executed',
  ]
  assert store.verify() == []
  store.close()


def test_a_budget_edited_in_the_table_is_refused_on_the_next_charge(tmp_path):
  store = governance_store.GovernanceStore(str(tmp_path))
  _study(store)
  store.decide('s1', approve=True, rounds=2)
  store.charge('s1', fingerprint='sha256:s1', caller='coordinator', clients=['a'])
  store.close()
  tamper_governance_db(str(tmp_path), 'UPDATE studies SET rounds_used = 0, rounds_approved = 50')
  store = governance_store.GovernanceStore(str(tmp_path))
  with pytest.raises(
    governance_store.TamperedError,
    match='rounds_approved is 50 in the studies table but 2 in the audit log',
  ):
    store.charge('s1', fingerprint='sha256:s1', caller='coordinator', clients=['a'])
  problems = store.verify()
  assert any('rounds_used is 0 in the studies table but 1' in p for p in problems)
  store.close()
  tamper_governance_db(
    str(tmp_path),
    'UPDATE studies SET rounds_used = 1, rounds_approved = 2',
    "UPDATE computations SET role = 'evaluate'",
  )
  store = governance_store.GovernanceStore(str(tmp_path))
  assert any('roles differ from those recorded at submission' in p for p in store.verify())
  store.close()


def test_deleting_the_tail_or_rechaining_the_log_is_caught(tmp_path):
  """Findings: deleting the log's last rows, or rewriting an entry and recomputing the
  chain, verified as intact."""

  def fresh(name):
    store = governance_store.GovernanceStore(str(tmp_path / name))
    for i in range(4):
      store.record('executed', caller='coordinator', study_id='s1', detail={'i': i})
    assert store.verify() == []
    store.close()
    return str(tmp_path / name)

  state = fresh('tail')
  tamper_governance_db(state, 'DELETE FROM audit WHERE seq > 2')
  store = governance_store.GovernanceStore(state)
  assert any('entry 3 is anchored but missing' in p for p in store.verify())
  store.close()

  state = fresh('rechain')
  db = sqlite3.connect(os.path.join(state, governance_store.DB_FILENAME))
  db.execute('DROP TRIGGER audit_no_update')
  rows = db.execute(
    'SELECT seq, time, event, caller, study_id, fingerprint, detail FROM audit ORDER BY seq'
  ).fetchall()
  prev = '0' * 64
  for seq, t, event, caller, study_id, fp, detail in rows:
    if seq == 2:
      detail = '{"i": 99}'
    row = {
      'time': t,
      'event': event,
      'caller': caller,
      'study_id': study_id,
      'fingerprint': fp,
      'detail': detail,
    }
    entry = governance_store._entry_hash(prev, row)
    db.execute(
      'UPDATE audit SET detail = ?, prev_hash = ?, entry_hash = ? WHERE seq = ?',
      (detail, prev, entry, seq),
    )
    prev = entry
  db.commit()
  db.close()
  store = governance_store.GovernanceStore(state)
  problems = store.verify()
  assert problems and 'entry 2 differs from its anchored hash' in problems[0], problems
  store.close()

  state = fresh('insert')  # An entry appended by other means has no anchor.
  db = sqlite3.connect(os.path.join(state, governance_store.DB_FILENAME))
  last = db.execute('SELECT entry_hash FROM audit ORDER BY seq DESC LIMIT 1').fetchone()[0]
  row = {
    'time': 0.0,
    'event': 'study_extended',
    'caller': 'x',
    'study_id': 's1',
    'fingerprint': None,
    'detail': '{}',
  }
  db.execute(
    'INSERT INTO audit (time, event, caller, study_id, fingerprint, detail, prev_hash,'
    ' entry_hash) VALUES (0.0, "study_extended", "x", "s1", NULL, "{}", ?, ?)',
    (last, governance_store._entry_hash(last, row)),
  )
  db.commit()
  db.close()
  store = governance_store.GovernanceStore(state)
  assert any('1 entry (from 5) have no anchor' in p for p in store.verify())
  store.close()
  os.remove(os.path.join(state, governance_store.ANCHOR_FILENAME))
  store = governance_store.GovernanceStore(state)
  assert any('anchor file' in p and 'is missing' in p for p in store.verify())
  store.close()


def test_audit_log_is_append_only_and_edits_are_detected(tmp_path):
  store = governance_store.GovernanceStore(str(tmp_path))
  store.record('executed', caller='coordinator', study_id='s1', detail={'clients': ['a']})
  store.record('executed', caller='coordinator', study_id='s1', detail={'clients': ['b']})
  for statement in ('UPDATE audit SET caller = "x"', 'DELETE FROM audit'):
    with pytest.raises(sqlite3.DatabaseError, match='append-only'):
      store._db.execute(statement)
  assert len(store.audit()) == 2 and store.verify_audit() == []
  store.close()
  # Someone bypasses the triggers and edits the file directly: the chain breaks.
  db = sqlite3.connect(os.path.join(tmp_path, governance_store.DB_FILENAME))
  db.execute('DROP TRIGGER audit_no_update')
  db.execute('UPDATE audit SET detail = \'{"clients": ["z"]}\' WHERE seq = 1')
  db.commit()
  db.close()
  store = governance_store.GovernanceStore(str(tmp_path))
  assert any('entry 1: its content does not match' in p for p in store.verify_audit())
  store.close()


def test_secure_round_keys_are_claimed_once_and_stay_claimed_across_a_restart(tmp_path):
  store = governance_store.GovernanceStore(str(tmp_path))
  _study(store)
  store.decide('s1', approve=True, rounds=2, evaluations=0)
  store.claim_secure_round('s1', 10, 0, ['a', 'b'], 'coordinator')
  store.claim_secure_round('s1', 10, 1, ['a'], 'coordinator')  # A rerun: a newer attempt.
  store.close()
  store = governance_store.GovernanceStore(str(tmp_path))  # The silo restarted.
  for old in ((10, 1), (10, 0), (9, 7)):
    with pytest.raises(governance_store.GovernanceError, match='not newer than round 10 attempt 1'):
      store.claim_secure_round('s1', *old, ['a', 'b'], 'coordinator')
  store.claim_secure_round('s1', 11, 0, ['a', 'b'], 'coordinator')
  keyed = [e for e in store.audit(study_id='s1') if e.event == 'secure_round_keyed']
  assert [(e.detail['round'], e.detail['attempt']) for e in keyed] == [(10, 0), (10, 1), (11, 0)]
  assert keyed[0].detail['roster'] == ['a', 'b']
  assert store.verify() == []
