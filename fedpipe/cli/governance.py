r"""The data owner's governance command (`fedpipe-governance`).

    fedpipe-governance --state_dir=/var/lib/fedpipe --policy=policy.toml list
    fedpipe-governance --state_dir=... --policy=... show STUDY_ID
    fedpipe-governance --state_dir=... --policy=... approve STUDY_ID [--rounds=N] [--evaluations=M]
    fedpipe-governance --state_dir=... --policy=... reject STUDY_ID --reason="..."
    fedpipe-governance --state_dir=... --policy=... extend STUDY_ID --rounds=N [--evaluations=M] [--yes]
    fedpipe-governance --state_dir=... --policy=... budget
    fedpipe-governance --state_dir=... audit [--study=STUDY_ID] [--verify]

`show` says what would run on the silo's data (each computation's fingerprint,
type signature, what leaves the silo, the TensorFlow ops it uses and which of
them touch files), the model, the privacy cost recomputed by the silo and
whether the study fits the policy, naming each computation's refused op or
type. `approve` re-checks the policy (the lifetime ε over all studies
included) and refuses a study that breaks it. `extend` adds rounds or
evaluations to an approved study (after a failed round was charged, say),
showing the new ε before asking to confirm. `budget` shows the lifetime ε
spent and committed on this silo's data. A statistics study (`fedpipe-stats`,
docs/federated_statistics.md) is reviewed, approved (`--rounds=N`: N
releases) and extended the same way; `show` prints its columns, bounds,
contribution limits, sensitivity, noise and thresholds. `audit --verify` checks the log's
hash chain, its anchor file and every study's counts against the log. Study ids may be abbreviated. Works while the silo
server runs (they share the SQLite database in --state_dir).
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import datetime
import json
import sys

from absl import app, flags

from fedpipe.errors import FedpipeError
from fedpipe.governance import policy as silo_policy
from fedpipe.governance import privacy_ledger
from fedpipe.governance import store as governance_store
from fedpipe.statistics import query as statistics_query

# show and approve read the submitted computations (TensorFlow Federated,
# seconds to import); the other commands do not import it.

_STATE_DIR = flags.DEFINE_string('state_dir', None, "The silo's --state_dir.")
_POLICY = flags.DEFINE_string('policy', None, "The silo's --policy file (for show/approve).")
_ROUNDS = flags.DEFINE_integer(
  'rounds', None, 'approve: rounds to allow (default: as requested); extend: rounds to add.'
)
_EVALUATIONS = flags.DEFINE_integer(
  'evaluations',
  None,
  'approve: evaluations to allow (default: as requested); extend: evaluations to add.',
)
_YES = flags.DEFINE_bool('yes', False, 'extend: do not ask for confirmation.')
_REASON = flags.DEFINE_string('reason', '', 'reject: why (the coordinator is told).')
_STATUS = flags.DEFINE_enum(
  'status', None, ['pending', 'approved', 'rejected'], 'list: only studies with this status.'
)
_STUDY = flags.DEFINE_string('study', None, 'audit: only entries of this study.')
_VERIFY = flags.DEFINE_bool('verify', False, "audit: check the log's hash chain.")
_FULL = flags.DEFINE_bool('full', False, 'show: full type signatures and op lists.')

_COMMANDS = ('list', 'show', 'approve', 'reject', 'extend', 'budget', 'audit')


class UsageError(FedpipeError, ValueError):
  pass


def _when(t: float | None) -> str:
  if t is None:
    return '-'
  return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime('%Y-%m-%d %H:%M:%SZ')


def _clip(text: str, limit: int = 300) -> str:
  return text if _FULL.value or len(text) <= limit else text[:limit] + ' …'


def _policy() -> silo_policy.SiloPolicy:
  if not _POLICY.value:
    raise UsageError('--policy is required for this command: the study is judged against it')
  return silo_policy.load_policy(_POLICY.value)


def _review(
  store: governance_store.GovernanceStore,
  study: governance_store.Study,
  policy: silo_policy.SiloPolicy,
) -> dict:
  """The silo's review of the study under the current policy."""
  from fedpipe.governance import gate as governance_gate
  from fedpipe.governance import study_request

  if statistics_query.is_statistics_request(study.request):
    return governance_gate.review_statistics_study(_statistics_query(study), policy)
  try:
    request = study_request.StudyRequest.from_json(study.request)
  except study_request.StudyRequestError as e:
    raise governance_store.GovernanceError(
      f'the stored request of study {study.study_id} is malformed: {e}'
    ) from e
  return governance_gate.review_study(
    request,
    policy,
    silo_clients=int(study.review.get('silo_clients', 0)),
    other_roles=store.roles_of([c.fingerprint for c in request.computations]),
  )


def _statistics_query(study: governance_store.Study) -> statistics_query.StatisticsQuery:
  try:
    return statistics_query.StatisticsQuery.from_json(study.request)
  except statistics_query.StatisticsQueryError as e:
    raise governance_store.GovernanceError(
      f'the stored query of statistics study {study.study_id} is malformed: {e}'
    ) from e


def _requested(study: governance_store.Study) -> int:
  """Rounds requested; a statistics study's releases."""
  if statistics_query.is_statistics_request(study.request):
    return int(study.request['releases'])
  return int(study.request['rounds'])


def _lifetime(
  store: governance_store.GovernanceStore,
  policy: silo_policy.SiloPolicy,
  privacy: dict,
  *,
  rounds: int,
  extension: bool = False,
):
  if privacy_ledger.noise_free_test_study(privacy, policy):
    return [], {}  # The lab's noise-free test mode: audited, not in the lifetime epsilon.
  return privacy_ledger.lifetime_violations(
    [r for r in store.ledger() if not privacy_ledger.noise_free_test_study(r['privacy'], policy)],
    delta=policy.delta,
    max_lifetime_epsilon=policy.max_lifetime_epsilon,
    privacy=privacy,
    rounds=rounds,
    extension=extension,
  )


def _list(store: governance_store.GovernanceStore) -> None:
  studies = store.studies(_STATUS.value)
  if not studies:
    print('no studies' + (f' with status {_STATUS.value}' if _STATUS.value else ''))
    return
  print(
    f'{"study":<17} {"status":<9} {"rounds":>9} {"evals":>7} {"caller":<16} {"submitted":<21} name'
  )
  for s in studies:
    if s.status == 'approved':
      rounds = f'{s.rounds_used}/{s.rounds_approved}'
      evals = f'{s.evaluations_used}/{s.evaluations_approved}'
    else:
      rounds, evals = f'-/{_requested(s)}', f'-/{s.request.get("evaluations", 0)}'
    if statistics_query.is_statistics_request(s.request):
      evals = 'stats'
    print(
      f'{s.study_id:<17} {s.status:<9} {rounds:>9} {evals:>7} {s.caller:<16} '
      f'{_when(s.submitted_at):<21} {s.name}'
    )


def _print_status(study: governance_store.Study) -> None:
  print(
    f'  status: {study.status}'
    + (f' ({study.reason})' if study.reason else '')
    + f'; submitted by {study.caller} at {_when(study.submitted_at)}'
    + (f'; decided at {_when(study.decided_at)}' if study.decided_at else '')
  )


def _show_statistics(
  store: governance_store.GovernanceStore,
  study: governance_store.Study,
  policy: silo_policy.SiloPolicy,
  review: dict,
) -> None:
  query = _statistics_query(study)
  print(f'statistics study {study.study_id} "{study.name}"')
  _print_status(study)
  print(
    f'  releases requested: {query.releases}; approved: {study.rounds_approved}; '
    f'used: {study.rounds_used}'
  )
  print(
    "\nWhat runs on this silo's raw data (--raw_data): the silo's own statistics pipeline; "
    'only noised values leave'
  )
  print(
    f'  client key {query.feature_spec.get("client_key")!r}; at most {query.max_rows_per_user} rows per user'
  )
  noise = review['noise_stddev']
  for c in query.columns:
    if c.kind == statistics_query.NUMERIC:
      print(
        f'  numeric {c.name}: clipped to [{c.min:g}, {c.max:g}], {c.bins} bins; noise std: '
        f'sum {noise[f"sum/{c.name}"]:.4g}, sum of squares {noise[f"sum_of_squares/{c.name}"]:.4g}, '
        f'each bin {noise[f"histogram/{c.name}"]:.4g}'
      )
    else:
      print(
        f'  categorical {c.name}: users per value, at most {c.max_values_per_user} value(s) per '
        f'user; noise std {noise[f"categorical/{c.name}"]:.4g}; a value is released only if '
        f'its noisy count exceeds {review["thresholds"][c.name]:.4g}'
      )
  print(f'  rows kept (noise std {noise["rows"]:.4g})')
  print(
    f'\nPrivacy (user-level DP, noise added by this silo): one Gaussian mechanism over '
    f'{review["blocks"]} blocks, each scaled to L2 sensitivity 1 (total sqrt({review["blocks"]})),'
    f' noise multiplier {query.noise_multiplier:g}; thresholding delta {query.threshold_delta:g} '
    'per release'
  )
  eps = review['epsilon_at_policy_delta']
  print(
    f'  epsilon at the policy delta {policy.delta:g}: '
    f'{"unbounded" if eps is None else f"{eps:.3f}"} for {query.releases} release(s) '
    '(recomputed here with dp-accounting)'
  )
  _print_fit(store, policy, study, review, query.privacy, rounds=query.releases)


def _print_fit(store, policy, study, review, privacy, *, rounds: int) -> None:
  """Prints whether a study fits the policy: its review's violations, and for a pending one the lifetime ε."""
  violations = list(review['violations'])
  if study.status == governance_store.PENDING:
    lifetime, epsilons = _lifetime(store, policy, privacy, rounds=rounds)
    violations += lifetime
    if epsilons:
      print(
        f"  lifetime epsilon on this silo's data if approved: {epsilons['committed']:.3f} "
        f'committed (max_lifetime_epsilon {policy.max_lifetime_epsilon:g})'
      )
  if violations:
    print(f'\nPolicy {policy.source}: does NOT fit')
    for v in violations:
      print(f'  - {v}')
  else:
    print(f'\nPolicy {policy.source}: fits')


def _show(store: governance_store.GovernanceStore, study_id: str) -> None:
  study = store.find(study_id)
  policy = _policy()
  review = _review(store, study, policy)
  if statistics_query.is_statistics_request(study.request):
    _show_statistics(store, study, policy, review)
    return
  p = study.request['privacy']
  model = study.request['model']
  print(f'study {study.study_id} "{study.name}"')
  _print_status(study)
  print(
    f'  rounds requested: {study.request["rounds"]}; approved: {study.rounds_approved}; '
    f'used: {study.rounds_used}'
  )
  print(
    f'  un-noised evaluations requested: {study.request.get("evaluations", 0)}; approved: '
    f'{study.evaluations_approved}; used: {study.evaluations_used}'
  )
  print("\nWhat runs on this silo's data:")
  for c in review['computations']:
    reads = ', '.join(c['io_ops']) or 'none'
    print(f'  {c["role"]}: computation {c["fingerprint"]}')
    print(f'    type: {_clip(c["type_signature"])}')
    numbers = c['output_numbers'] if c['output_numbers'] is not None else 'an unknown number of'
    print(f'    leaves the silo ({numbers} numbers per call): {_clip(c["leaves_silo"])}')
    print(f'    file/IO ops: {reads} (TFRecordDataset reads client data by id)')
    print(f'    federated intrinsics: {", ".join(c["intrinsics"]) or "none"}')
    ops = ', '.join(c['tensorflow_ops'])
    print(f'    TensorFlow ops ({len(c["tensorflow_ops"])}): {_clip(ops, 200)}')
  print(f'\nModel: {model.get("name")}, {model.get("parameters"):,} parameters')
  if _FULL.value:
    print(model.get('summary', ''))
  print(
    '\nPrivacy (client-level DP; the noise is added by the coordinator after merging '
    'silo aggregates):'
  )
  print(
    f'  noise multiplier {p["noise_multiplier"]}, {p["clipping"]} clipping at '
    f'{p["clip_norm"]}, {p["sampling"]} sampling of {p["clients_per_round"]} of '
    f'{p["population_size"]} clients per round'
  )
  eps = review['epsilon_at_policy_delta']
  print(
    f'  epsilon at the policy delta {policy.delta:g}: '
    f'{"unbounded" if eps is None else f"{eps:.3f}"} (recomputed here with dp-accounting; '
    f'the coordinator stated {p.get("epsilon")} at delta {p.get("delta")})'
  )
  _print_fit(store, policy, study, review, p, rounds=int(study.request['rounds']))


def _decide(store: governance_store.GovernanceStore, study_id: str, approve: bool) -> None:
  study = store.find(study_id)
  if approve:
    policy = _policy()
    review = _review(store, study, policy)
    statistics = statistics_query.is_statistics_request(study.request)
    rounds = _ROUNDS.value if _ROUNDS.value is not None else _requested(study)
    evaluations = (
      _EVALUATIONS.value
      if _EVALUATIONS.value is not None
      else int(study.request.get('evaluations', 0))
    )
    violations = list(review['violations'])
    if statistics:
      if evaluations:
        violations.append('a statistics study makes no evaluations (--evaluations)')
      if rounds > policy.max_statistics_releases:
        violations.append(
          f'releases {rounds} exceeds [statistics] max_releases {policy.max_statistics_releases}'
        )
    elif rounds > policy.max_rounds:
      violations.append(f'rounds {rounds} exceeds max_rounds {policy.max_rounds}')
    if rounds < 1 or evaluations < 0:
      violations.append('--rounds must be >= 1 and --evaluations >= 0')
    violations += policy.evaluation_violations(evaluations)
    lifetime, _ = _lifetime(store, policy, study.request['privacy'], rounds=rounds)
    violations += lifetime
    if violations:
      raise governance_store.GovernanceError(
        f'study {study.study_id} cannot be approved under {policy.source}:\n  - '
        + '\n  - '.join(dict.fromkeys(violations))
      )
    study = store.decide(study.study_id, approve=True, rounds=rounds, evaluations=evaluations)
    if statistics:
      print(f'approved statistics study {study.study_id} for {study.rounds_approved} release(s)')
      return
    print(
      f'approved study {study.study_id} for {study.rounds_approved} rounds and '
      f'{study.evaluations_approved} evaluations'
    )
  else:
    if not _REASON.value:
      raise UsageError('reject needs --reason="..." (the coordinator is told)')
    study = store.decide(study.study_id, approve=False, reason=_REASON.value)
    print(f'rejected study {study.study_id}: {_REASON.value}')


def _extend(store: governance_store.GovernanceStore, study_id: str) -> int:
  """Adds rounds/evaluations to an approved study after showing what they cost."""
  study = store.find(study_id)
  policy = _policy()
  rounds, evaluations = _ROUNDS.value or 0, _EVALUATIONS.value or 0
  if rounds < 0 or evaluations < 0 or rounds + evaluations == 0:
    raise UsageError('extend needs --rounds=N and/or --evaluations=M (N, M > 0)')
  if study.status != governance_store.APPROVED:
    raise governance_store.GovernanceError(
      f'study {study.study_id} is {study.status}; only an approved study can be extended'
    )
  privacy = study.request['privacy']
  new_rounds = study.rounds_approved + rounds
  new_evaluations = study.evaluations_approved + evaluations
  epsilon_now = privacy_ledger.study_epsilon(privacy, study.rounds_approved, delta=policy.delta)
  epsilon_new = privacy_ledger.study_epsilon(privacy, new_rounds, delta=policy.delta)
  if privacy_ledger.is_statistics(privacy):
    violations = policy.statistics_violations(
      epsilon=epsilon_new,
      noise_multiplier=float(privacy['noise_multiplier']),
      releases=new_rounds,
    )
    if evaluations:
      violations.append('a statistics study makes no evaluations (--evaluations)')
  else:
    violations = _training_violations(policy, privacy, epsilon_new, new_rounds, new_evaluations)
  lifetime, epsilons = _lifetime(store, policy, privacy, rounds=rounds, extension=True)
  violations += lifetime
  _print_extension(study, policy, new_rounds, new_evaluations, epsilon_now, epsilon_new, epsilons)
  return _confirm_extension(store, study, policy, violations, rounds, evaluations)


def _training_violations(policy, privacy, epsilon_new, new_rounds, new_evaluations) -> list[str]:
  return policy.violations(
    epsilon=epsilon_new,
    noise_multiplier=float(privacy['noise_multiplier'] or 0.0),
    clipping=str(privacy['clipping']),
    clip_norm=float(privacy['clip_norm'] or 0.0),
    rounds=new_rounds,
    clients_per_round=int(privacy['clients_per_round']),
    evaluations=new_evaluations,
  )


def _print_extension(
  study, policy, new_rounds, new_evaluations, epsilon_now, epsilon_new, epsilons
):
  print(
    f'study {study.study_id} "{study.name}": {study.rounds_used} of {study.rounds_approved} '
    f'rounds and {study.evaluations_used} of {study.evaluations_approved} evaluations used'
  )
  print(f'  extend to {new_rounds} rounds and {new_evaluations} evaluations')
  print(
    f'  epsilon at delta {policy.delta:g}: {epsilon_now:.3f} -> {epsilon_new:.3f} '
    f'(max_epsilon {policy.max_epsilon:g})'
  )
  if epsilons:
    print(
      f"  lifetime epsilon committed on this silo's data: {epsilons['committed']:.3f} "
      f'(max_lifetime_epsilon {policy.max_lifetime_epsilon:g})'
    )


def _confirm_extension(store, study, policy, violations, rounds, evaluations) -> int:
  if violations:
    raise governance_store.GovernanceError(
      f'study {study.study_id} cannot be extended under {policy.source}:\n  - '
      + '\n  - '.join(violations)
    )
  if not _YES.value:
    print('extend? [y/N] ', end='', flush=True)
    answer = sys.stdin.readline().strip().lower()
    if answer not in ('y', 'yes'):
      print('not extended')
      return 1
  study = store.extend(study.study_id, rounds=rounds, evaluations=evaluations)
  print(
    f'extended study {study.study_id} to {study.rounds_approved} rounds and '
    f'{study.evaluations_approved} evaluations'
  )
  return 0


def _budget(store: governance_store.GovernanceStore) -> None:
  policy = _policy()
  ledger = store.ledger()
  epsilons = privacy_ledger.ledger_epsilons(ledger, delta=policy.delta)
  print(
    f"lifetime epsilon on this silo's data at delta {policy.delta:g} "
    f'(max_lifetime_epsilon {policy.max_lifetime_epsilon:g}):'
  )
  print(
    f'  spent (rounds charged):      {epsilons["spent"]:.4f}; left '
    f'{max(policy.max_lifetime_epsilon - epsilons["spent"], 0.0):.4f}'
  )
  print(
    f'  committed (rounds approved): {epsilons["committed"]:.4f}; left '
    f'{max(policy.max_lifetime_epsilon - epsilons["committed"], 0.0):.4f}'
  )
  for row in ledger:
    spent = privacy_ledger.study_epsilon(row['privacy'], row['rounds_used'], delta=policy.delta)
    print(
      f'  study {row["study_id"]}: {row["rounds_used"]}/{row["rounds_approved"]} '
      f'{"releases" if privacy_ledger.is_statistics(row["privacy"]) else "rounds"}, '
      f'epsilon {spent:.4f} spent'
    )


def _audit(store: governance_store.GovernanceStore) -> int:
  study_id = store.find(_STUDY.value).study_id if _STUDY.value else None
  for e in store.audit(study_id=study_id):
    detail = dict(e.detail)
    clients = detail.pop('clients', None)
    if clients is not None:
      detail['clients'] = f'{len(clients)}: {", ".join(clients[:4])}' + (
        ', …' if len(clients) > 4 else ''
      )
    fp = e.fingerprint.split(':', 1)[-1][:12] if e.fingerprint else '-'
    print(
      f'{e.seq:>6} {_when(e.time)} {e.event:<16} {e.caller or "-":<14} '
      f'{e.study_id or "-":<17} {fp:<12} {json.dumps(detail, ensure_ascii=False)}'
    )
  if _VERIFY.value:
    problems = store.verify()
    if problems:
      print('audit log TAMPERED:\n  - ' + '\n  - '.join(problems), file=sys.stderr)
      return 1
    print(
      f'audit log intact: {len(store.audit())} entries, hash chain and anchor verified, '
      'study counts match the log'
    )
  return 0


def main(argv: list[str]) -> int:
  args = argv[1:]
  try:
    if not args or args[0] not in _COMMANDS:
      raise UsageError(f'give a command: one of {", ".join(_COMMANDS)}')
    command, rest = args[0], args[1:]
    needs_id = command in ('show', 'approve', 'reject', 'extend')
    if needs_id != (len(rest) == 1) or len(rest) > 1:
      raise UsageError(f'{command} takes {"one study id" if needs_id else "no arguments"}')
    if not _STATE_DIR.value:
      raise UsageError("--state_dir is required (the silo server's --state_dir)")
    if not os.path.exists(os.path.join(_STATE_DIR.value, governance_store.DB_FILENAME)):
      raise UsageError(
        f"no governance state in {_STATE_DIR.value!r}: is it the silo's --state_dir?"
      )
    store = governance_store.GovernanceStore(_STATE_DIR.value)
    try:
      if command == 'list':
        _list(store)
      elif command == 'show':
        _show(store, rest[0])
      elif command in ('approve', 'reject'):
        _decide(store, rest[0], approve=command == 'approve')
      elif command == 'extend':
        return _extend(store, rest[0])
      elif command == 'budget':
        _budget(store)
      else:
        return _audit(store)
    finally:
      store.close()
  except FedpipeError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


def run() -> None:
  """Console-script entrypoint."""
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == '__main__':
  run()
