"""Enforces a silo's policy on every executor call, before it reaches the worker.

The `CallGate` of a governed silo server. For each call from a coordinator it
checks, in order:

* the caller's certificate name is in the policy's `allowed_callers`;
* every computation sent (`CreateValue`) has the fingerprint of a
  computation in a study approved for this caller, so nothing unapproved is
  ever loaded by the worker, let alone run on data;
* client ids sent are ids this silo holds, each at most once and at least
  `min_clients_per_aggregate` of them at once, counted in users: a CLIENTS
  value of the cohort engine names several users ('u1,u2,u3',
  `client_ids.COHORT_SEPARATOR`), and each of them is checked and counted;
* a clipping norm sent in the server state does not exceed `max_clip_norm`;
* every call (`CreateCall`) of an approved computation, whatever the
  coordinator calls it, is refused when its study's budget for the
  computation's role is spent (training rounds or evaluations, set at
  approval; the role is the one recorded at submission, where one
  computation can have only one role on a silo);
* a call is charged, with its privacy cost recomputed here from the study's
  approved parameters, when a value carrying its result is first computed
  for the caller, or when it fails, before the result or the error leaves
  the silo: a call whose result never left (the round failed elsewhere
  first) is not charged, and nothing leaves uncharged. A charge that would pass the policy's lifetime ε, or that finds
  the state disagreeing with its audit log, withholds the result.

It also takes the study requests coordinators send to ask for approval
(`submit_study`, `study_status`: the silo server decodes the `fedpipe.Silo`
methods `SubmitStudy` and `StudyStatus` and answers with what they return or
raise, see `fedpipe.federation.silo_protocol`), and runs statistics studies
(`submit_statistics_study`, `release_statistics`: `SubmitStatisticsStudy`,
`ReleaseStatistics`): the silo's own pipeline computes the approved query's
statistics on its raw data, the gate noises them (`fedpipe.statistics.mechanism`),
charges the release and audits it before anything leaves.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from tensorflow_federated.proto.v0 import executor_pb2

from fedpipe.computations import privacy_accounting
from fedpipe.data import client_ids as client_ids_lib
from fedpipe.errors import FedpipeError
from fedpipe.governance import fingerprint as computation_fingerprint
from fedpipe.governance import policy as silo_policy
from fedpipe.governance import privacy_ledger, secure_terms, study_request
from fedpipe.governance import review as computation_review
from fedpipe.governance import store as governance_store
from fedpipe.runtime import executor_service
from fedpipe.statistics import mechanism as statistics_mechanism
from fedpipe.statistics import query as statistics_query

LOG = logging.getLogger('fedpipe.silo')
_MAX_TRACKED_EXECUTORS = 64


@dataclasses.dataclass(frozen=True)
class _ValueInfo:
  """What the gate knows about a value on the worker.

  `pending` holds the reservations of calls whose results this value carries
  and that are not charged yet: whichever value of that lineage is computed
  first (released to the caller) charges them.
  """

  fingerprint: str | None = None
  clients: frozenset[str] = frozenset()
  pending: frozenset[int] = frozenset()


def _walk(value: executor_pb2.Value, name: str = '', placement: str = ''):
  """Yields (kind, payload) for computations, client-id lists and named scalars."""
  kind = value.WhichOneof('value')
  if kind == 'computation':
    yield 'computation', value.computation
  elif kind == 'struct':
    for element in value.struct.element:
      yield from _walk(element.value, element.name, placement)
  elif kind == 'federated':
    uri = value.federated.type.placement.value.uri
    members = list(value.federated.value)
    if (
      uri == 'clients'
      and members
      and all(m.WhichOneof('value') == 'array' and m.array.HasField('string_list') for m in members)
    ):
      yield (
        'client_ids',
        [s.decode('utf-8', 'replace') for m in members for s in m.array.string_list.value],
      )
    for member in members:
      yield from _walk(member, name, uri)
  elif kind == 'array' and name == 'l2_norm_clip' and value.array.float32_list.value:
    yield 'clip_norm', float(value.array.float32_list.value[0])


def review_study(
  request: study_request.StudyRequest,
  policy: silo_policy.SiloPolicy,
  *,
  silo_clients: int,
  other_roles: dict[str, set[tuple[str, str]]] | None = None,
  silo_name: str | None = None,
) -> dict[str, Any]:
  """The silo's own reading of a request: recomputed ε, what each computation does, violations.

  Args:
    request: The study as submitted.
    policy: The silo's policy.
    silo_clients: How many clients this silo holds.
    other_roles: Fingerprint -> {(study id, role)} of computations already
      submitted in other studies: one computation has one role on a silo.
    silo_name: This silo's name (a secure study's roster must include it).

  Returns:
    A JSON-able review; `violations` lists every reason the study does not
    fit, naming the computation and the op or type where it is one of them.
  """
  privacy = request.privacy
  violations = []
  try:
    epsilon = privacy_ledger.study_epsilon(privacy, request.rounds, delta=policy.delta)
  except (privacy_accounting.PrivacyAccountingError, KeyError, TypeError, ValueError) as e:
    epsilon = float('inf')
    violations.append(f'privacy parameters cannot be accounted for: {e}')
  try:
    violations += policy.violations(
      epsilon=epsilon,
      noise_multiplier=float(privacy['noise_multiplier'] or 0.0),
      clipping=str(privacy['clipping']),
      clip_norm=float(privacy['clip_norm'] or 0.0),
      rounds=request.rounds,
      clients_per_round=int(privacy['clients_per_round']),
      evaluations=request.evaluations,
    )
    if int(privacy['population_size']) < silo_clients:
      violations.append(
        f'population_size {privacy["population_size"]} is smaller than this '
        f"silo's {silo_clients} clients: the sampling rate would be understated"
      )
  except (KeyError, TypeError, ValueError) as e:
    violations.append(f'privacy parameters are malformed: {e}')
  if _noise_free_lab_study(privacy, policy):
    # The test mode a lab policy allows: no noise, so no epsilon to bound.
    violations = [v for v in violations if not v.startswith(('epsilon ', 'noise_multiplier '))]
  violations += _secure_aggregation_violations(request, policy, silo_name)
  computations = []
  roles = collections.Counter(c.role for c in request.computations)
  for role, count in roles.items():
    if count > 1:
      violations.append(f'{count} computations have the role {role}; a study has one of each')
  for c in request.computations:
    description = computation_review.describe(c.proto, policy.extra_allowed_ops)
    name = f'{c.role} computation {computation_fingerprint.short(c.fingerprint)}'
    for problem in list(description.problems) + computation_review.role_problems(
      c.role, description
    ):
      violations.append(f'{name}: {problem}')
    for other_study, other_role in sorted((other_roles or {}).get(c.fingerprint, ())):
      if other_role != c.role and other_study != request.study_id:
        violations.append(
          f'{name} was submitted as {other_role} in study {other_study}; a '
          'computation has one role on this silo'
        )
    computations.append(dict(role=c.role, fingerprint=c.fingerprint, **description.to_json()))
  return {
    'epsilon_at_policy_delta': epsilon if epsilon != float('inf') else None,
    'policy_delta': policy.delta,
    'silo_clients': silo_clients,
    'stated_epsilon': privacy.get('epsilon'),
    'violations': violations,
    'computations': computations,
  }


def _noise_free_lab_study(privacy: dict[str, Any], policy: silo_policy.SiloPolicy) -> bool:
  return privacy_ledger.noise_free_test_study(privacy, policy)


StatisticsSource = Callable[
  [statistics_query.StatisticsQuery], statistics_mechanism.ExactStatistics
]
"""Computes a query's exact statistics on the silo's raw data (`feature_statistics`)."""


class StatisticsUnavailableError(FedpipeError, RuntimeError):
  """This silo cannot compute statistics (no raw data, or its pipeline failed); the message says why."""


def review_statistics_study(
  query: statistics_query.StatisticsQuery, policy: silo_policy.SiloPolicy
) -> dict[str, Any]:
  """The silo's own reading of a statistics query: ε, sensitivity, noise, thresholds, violations.

  Returns:
    A JSON-able review (`kind: statistics`); `violations` lists every reason
    it does not fit the policy.
  """
  privacy = query.privacy
  epsilon = privacy_ledger.study_epsilon(privacy, query.releases, delta=policy.delta)
  violations = policy.statistics_violations(
    epsilon=epsilon, noise_multiplier=query.noise_multiplier, releases=query.releases
  )
  noise = statistics_mechanism.noise(query)
  return {
    'kind': 'statistics',
    'epsilon_at_policy_delta': epsilon if epsilon != float('inf') else None,
    'policy_delta': policy.delta,
    'violations': violations,
    'releases': query.releases,
    'max_rows_per_user': query.max_rows_per_user,
    'noise_multiplier': query.noise_multiplier,
    'threshold_delta': query.threshold_delta,
    'blocks': statistics_mechanism.block_count(query),
    'sensitivities': statistics_mechanism.block_sensitivities(query),
    'columns': [dataclasses.asdict(c) for c in query.columns],
    'noise_stddev': {
      'rows': noise.rows,
      **{f'sum/{k}': v for k, v in noise.sum.items()},
      **{f'sum_of_squares/{k}': v for k, v in noise.sum_of_squares.items()},
      **{f'histogram/{k}': v for k, v in noise.histogram.items()},
      **{f'categorical/{k}': v for k, v in noise.categorical.items()},
    },
    'thresholds': dict(noise.thresholds),
  }


def _secure_aggregation_violations(
  request: study_request.StudyRequest, policy: silo_policy.SiloPolicy, silo_name: str | None
) -> list[str]:
  """Whether the study's secure-aggregation terms (or their absence) fit the policy and the study."""
  privacy = request.privacy
  try:
    terms = secure_terms.terms_of(privacy)
  except secure_terms.SecureTermsError as e:
    return [str(e)]
  found = policy.secure_aggregation_violations(terms, silo_name=silo_name)
  if terms is None:
    return found
  if terms.noise_multiplier != float(privacy.get('noise_multiplier') or 0.0):
    found.append(
      f'secure_aggregation.noise_multiplier {terms.noise_multiplier:g} differs from the '
      f"study's noise_multiplier {privacy.get('noise_multiplier')}"
    )
  if privacy.get('clipping') != 'fixed':
    found.append('secure aggregation needs fixed clipping (adaptive clipping is not supported)')
  if privacy.get('sampling') != 'poisson':
    found.append('secure aggregation is accounted for Poisson sampling only (sampling=poisson)')
  train = [c for c in request.computations if c.role == study_request.ROLE_TRAIN]
  if train:
    dim = noised_dimension(train[0].proto, terms.noised_path)
    if isinstance(dim, str):
      found.append(f'secure_aggregation.noised_path {list(terms.noised_path)}: {dim}')
    elif dim != terms.dim:
      found.append(
        f'secure_aggregation.dim is {terms.dim}, but the training computation puts {dim} '
        f'values at noised_path {list(terms.noised_path)}'
      )
  return found


def noised_dimension(proto, path: tuple[int, ...]) -> int | str:
  """How many float values the training computation's result holds at `path`, or why none.

  The silo counts the coordinates that get noise in the computation it
  approves; the coordinator's `dim` is only a claim checked against this.
  """
  import tensorflow_federated as tff  # Seconds to import: only where studies are reviewed.

  result = tff.framework.deserialize_computation(proto).type_signature.result
  node = result.member if isinstance(result, tff.FederatedType) else result
  for index in path:
    if not isinstance(node, tff.StructType) or not 0 <= index < len(node):
      return 'it does not lead into the result'
    node = node[index]
  leaves = list(_tensor_leaves(node))
  if not leaves or not all(
    isinstance(t, tff.TensorType)
    and np.issubdtype(t.dtype, np.floating)
    and t.shape is not None
    and all(d is not None for d in t.shape)
    for t in leaves
  ):
    return 'the values there are not all float tensors of known shape'
  return sum(math.prod(t.shape) for t in leaves)


def _tensor_leaves(node):
  import tensorflow_federated as tff

  if isinstance(node, tff.StructType):
    for element in node:
      yield from _tensor_leaves(element)
  else:
    yield node


@dataclasses.dataclass
class _Reservation:
  """A call that ran (or runs) on client data, charged when its result is released."""

  study_id: str
  fingerprint: str
  role: str
  caller: str
  executor_id: str
  clients: tuple[str, ...]
  charged: bool = False


class GovernanceGate:
  """A silo's policy and governance state, applied to executor calls."""

  def __init__(
    self,
    policy: silo_policy.SiloPolicy,
    store: governance_store.GovernanceStore,
    *,
    client_ids: Iterable[str],
    silo_name: str,
    statistics: StatisticsSource | None = None,
  ):
    """Checks the governance state against its audit log, then gates calls with it.

    Args:
      policy: The data owner's policy.
      store: The silo's governance state.
      client_ids: The client ids of the silo's preprocessed data (none in
        statistics-only mode).
      silo_name: This silo's name.
      statistics: Computes a statistics query on the silo's raw data; None
        when the silo was started without raw data (statistics studies are
        then refused).

    Raises:
      governance_store.TamperedError: If the state or its log was altered.
    """
    problems = store.verify()
    if problems:
      raise governance_store.TamperedError(
        f'governance state {store.path} is TAMPERED; the silo will not run on it:\n  - '
        + '\n  - '.join(problems)
      )
    self.policy = policy
    self.store = store
    self._client_ids = frozenset(client_ids)
    self._silo = silo_name
    self._lock = threading.Lock()
    self._charge_lock = threading.Lock()
    self._values: collections.OrderedDict[str, dict[str, _ValueInfo]] = collections.OrderedDict()
    self._pending: collections.OrderedDict[int, _ValueInfo] = collections.OrderedDict()
    self._fingerprints: dict[bytes, str] = {}
    self._reservations: dict[int, _Reservation] = {}
    self._next_reservation = 0
    self._releasing_masked = threading.local()  # Per gRPC handler thread.
    self._terms: dict[str, secure_terms.SecureAggregationTerms | None] = {}
    self._statistics = statistics
    self._statistics_lock = threading.Lock()

  # CallGate.

  def check(self, method: str, request, caller: str) -> str | None:
    refusal = self.policy.caller_refusal(caller)
    if refusal is not None:
      return refusal
    if method not in executor_service.EXECUTOR_LIFECYCLE_METHODS:
      # Values of an executor the gate no longer tracks (disposed, or evicted
      # past _MAX_TRACKED_EXECUTORS) could carry uncharged results.
      computes = method == executor_service.COMPUTE
      with self._lock:
        values = self._values.get(request.executor.id)
        info = values.get(request.value_ref.id) if values and computes else None
      if values is None or (computes and info is None):
        return self._refuse(
          caller,
          f'{method} on an executor or value this silo does not '
          'track (disposed or evicted); start a new executor',
        )
      if computes:  # What the released value carries, fixed before it runs.
        if not getattr(self._releasing_masked, 'active', False):
          # The same computation may be approved in a secure and a central
          # study: a plain release goes to the oldest central one with rounds left.
          self._retarget(info, lambda study_id: self.secure_terms(study_id) is None)
        masked_only = self._masked_only_study(info)
        if masked_only is not None and not getattr(self._releasing_masked, 'active', False):
          return self._refuse(
            caller,
            f'the training results of study {masked_only} leave this silo only masked '
            '(secure aggregation); ask for them with SecureRelease',
            study_id=masked_only,
          )
        unmasked = self._unmasked_training_study(info)
        if unmasked is not None:
          # Checked at release, not only at review: a study approved before
          # the policy changed, or approved around the review, still cannot
          # take a partial sum out unmasked.
          return self._refuse(
            caller,
            f'this silo requires secure aggregation ([secure_aggregation] '
            f'require_secure_aggregation = true); study {unmasked} would take its training '
            'result out unmasked',
            study_id=unmasked,
          )
        self._stage(request, info)
    if method == executor_service.CREATE_VALUE:
      return self._check_value(request, caller)
    if method == executor_service.CREATE_CALL:
      return self._check_call(request, caller)
    if method == executor_service.CREATE_STRUCT:
      refs = [e.value_ref.id for e in request.element]
      self._stage(request, self._lineage(request.executor.id, refs))
    elif method == executor_service.CREATE_SELECTION:
      self._stage(request, self._lineage(request.executor.id, [request.source_ref.id]))
    return None

  def on_forwarded(self, method: str, request, response, caller: str) -> str | None:
    """Tracks values; charges calls whose results are about to leave the silo.

    Returns:
      None to release `response`, or why it is withheld.
    """
    if method == executor_service.GET_EXECUTOR:
      with self._lock:
        self._values[response.executor.id] = {}
        while len(self._values) > _MAX_TRACKED_EXECUTORS:
          executor_id, _ = self._values.popitem(last=False)
          self._drop_reservations(executor_id)
    elif method == executor_service.DISPOSE_EXECUTOR:
      with self._lock:
        self._values.pop(request.executor.id, None)
        self._drop_reservations(request.executor.id)
    elif method in executor_service.VALUE_CREATING_METHODS:
      with self._lock:
        info = self._pending.pop(id(request), None)
        if info is not None:
          self._values.setdefault(request.executor.id, {})[response.value_ref.id] = info
    elif method == executor_service.COMPUTE:
      with self._lock:
        info = self._pending.pop(id(request), None)
      if info is None:
        return "the value's lineage was lost while it was computed; it is not released"
      if info.pending:
        return self._charge(info.pending, caller)
    return None

  def on_failed(self, method: str, request, caller: str) -> str | None:
    """Charges the calls behind a failed call or computation before its error leaves.

    An approved computation can fail on purpose, depending on the data (an
    `Assert`): its error is a release like its result.

    Returns:
      None to send the error, or why it is withheld.
    """
    with self._lock:
      info = self._pending.pop(id(request), None)
    calls = method in (executor_service.CREATE_CALL, executor_service.COMPUTE)
    if calls and info is not None and info.pending:
      return self._charge(info.pending, caller)
    return None

  # Secure aggregation.

  def _training_studies(self, info: _ValueInfo) -> set[str]:
    """The studies whose training calls `info` carries uncharged."""
    with self._lock:
      return {
        r.study_id
        for k in info.pending
        if (r := self._reservations.get(k)) is not None and r.role == governance_store.ROLE_TRAIN
      }

  def _masked_only_study(self, info: _ValueInfo) -> str | None:
    """The secure-aggregation study whose training result `info` carries, if any."""
    studies = self._training_studies(info)
    for study_id in sorted(studies):
      if self.secure_terms(study_id) is not None:
        return study_id
    return None

  def _unmasked_training_study(self, info: _ValueInfo) -> str | None:
    """Under `require_secure_aggregation`: a study without secure terms whose training
    result `info` carries, if any."""
    if not self.policy.require_secure_aggregation:
      return None
    studies = self._training_studies(info)
    for study_id in sorted(studies):
      if self.secure_terms(study_id) is None:
        return study_id
    return None

  @property
  def client_count(self) -> int:
    """How many clients this silo holds (the most a round can use here)."""
    return len(self._client_ids)

  def claim_training_result(self, executor_id: str, value_ref: str, study_id: str) -> bool:
    """Whether the value `value_ref` carries a training result of the secure study
    `study_id` (and of no other secure study), once its uncharged training calls
    are charged to that study where it holds their computation.

    The computation of a round can be approved in several studies; the call
    was reserved against the oldest with rounds left. A SecureRelease for
    `study_id` names the study it is for.
    """
    with self._lock:
      info = self._values.get(executor_id, {}).get(value_ref)
    if info is None or self.secure_terms(study_id) is None:
      return False
    self._retarget(info, lambda candidate: candidate == study_id)
    studies = self._training_studies(info)
    return studies == {study_id}

  def _retarget(self, info: _ValueInfo, wanted: Callable[[str], bool]) -> None:
    """Moves the uncharged training reservations behind `info` to the oldest approved
    study that holds their computation, is `wanted` and has rounds left."""
    with self._lock:
      due = [
        r
        for k in info.pending
        if (r := self._reservations.get(k)) is not None
        and not r.charged
        and r.role == governance_store.ROLE_TRAIN
      ]
    for r in due:
      if wanted(r.study_id):
        continue
      for study_id, role in self.store.approved_computations(r.caller).get(r.fingerprint, []):
        if role != governance_store.ROLE_TRAIN or not wanted(study_id):
          continue
        study = self.store.get(study_id)
        if study is not None and study.rounds_remaining > 0:
          with self._lock:
            r.study_id = study_id
          break

  def secure_terms(self, study_id: str) -> secure_terms.SecureAggregationTerms | None:
    """The approved secure-aggregation terms of a study (as stored at submission).

    A stored request never changes: read once per study, not on every Compute.
    """
    with self._lock:
      if study_id in self._terms:
        return self._terms[study_id]
    study = self.store.get(study_id)
    if study is None:
      return None
    terms = secure_terms.terms_of(study.request['privacy'])
    with self._lock:
      self._terms[study_id] = terms
    return terms

  @contextlib.contextmanager
  def releasing_masked(self) -> Iterator[None]:
    """Within the block, a secure study's training result may be computed: the silo
    server's SecureRelease encodes and masks it before anything leaves."""
    self._releasing_masked.active = True
    try:
      yield
    finally:
      self._releasing_masked.active = False

  # Checks.

  def _stage(self, request, info: _ValueInfo) -> None:
    with self._lock:
      self._pending[id(request)] = info
      while len(self._pending) > 10_000:
        self._pending.popitem(last=False)

  def _lineage(self, executor_id: str, refs: Iterable[str]) -> _ValueInfo:
    """The clients and uncharged calls a value made of `refs` carries."""
    with self._lock:
      values = self._values.get(executor_id, {})
      found = [values[r] for r in refs if r in values]
    return _ValueInfo(
      clients=frozenset().union(*(v.clients for v in found)),
      pending=frozenset().union(*(v.pending for v in found)),
    )

  def _drop_reservations(self, executor_id: str) -> None:
    """Forgets an executor's calls: its values are gone (caller holds `_lock`)."""
    for key in [k for k, r in self._reservations.items() if r.executor_id == executor_id]:
      del self._reservations[key]

  def _fingerprint(self, computation) -> str:
    """The fingerprint, memoized by the sent bytes: a run resends the same computation."""
    key = hashlib.sha256(computation.SerializeToString()).digest()
    with self._lock:
      cached = self._fingerprints.get(key)
    if cached is None:
      cached = computation_fingerprint.fingerprint(computation)
      with self._lock:
        if len(self._fingerprints) > 256:
          self._fingerprints.clear()
        self._fingerprints[key] = cached
    return cached

  def _refuse(self, caller: str, reason: str, **detail) -> str:
    self.store.record(
      'refused',
      caller=caller,
      study_id=detail.pop('study_id', None),
      fingerprint=detail.pop('fingerprint', None),
      detail=dict(detail, reason=reason),
    )
    return reason

  def _unapproved_reason(self, fp: str, caller: str) -> str:
    known = [s for s in self.store.studies_with(fp) if s.caller == caller]
    short = computation_fingerprint.short(fp)
    if not known:
      return (
        f'computation {short} is not part of any study submitted by {caller!r}; '
        'it was refused before running. Submit it as a study and have the data owner '
        'approve it'
      )
    states = ', '.join(f'study {s.study_id} is {s.status}' for s in known)
    return f'computation {short} is not approved for {caller!r} ({states})'

  def _check_value(self, request, caller: str) -> str | None:
    info = _ValueInfo()
    approved = None
    for kind, payload in _walk(request.value):
      if kind == 'computation':
        fp = self._fingerprint(payload)
        if approved is None:
          approved = self.store.approved_computations(caller)
        if fp not in approved:
          return self._refuse(caller, self._unapproved_reason(fp, caller), fingerprint=fp)
        info = dataclasses.replace(info, fingerprint=fp)
      elif kind == 'client_ids':
        users = [u for value in payload for u in client_ids_lib.cohort_members(value)]
        refusal = self._users_refusal(payload, users)
        if refusal is not None:
          return self._refuse(caller, refusal)
        info = dataclasses.replace(info, clients=info.clients | frozenset(users))
      elif kind == 'clip_norm' and payload > self.policy.max_clip_norm * (1 + 1e-6):
        return self._refuse(
          caller,
          f"clipping norm {payload:g} exceeds this silo's "
          f'max_clip_norm {self.policy.max_clip_norm:g}',
        )
    self._stage(request, info)
    return None

  def _users_refusal(self, values: list[str], users: list[str]) -> str | None:
    """Why the users one aggregate's CLIENTS values name may not be aggregated, or None.

    A value is a client id or a cohort of them ('u1,u2,u3'); `users` are the
    ids they name (`client_ids.cohort_members`), and what the policy counts.
    The coordinator is not trusted to group them honestly: every user must
    be one of this silo's, named once in all the aggregate's cohorts, and
    there must be at least `min_clients_per_aggregate` of them.
    """
    empty = [v for v in values if '' in client_ids_lib.cohort_members(v)]
    if empty:
      return (
        f'{len(empty)} client value(s) name an empty client id (a cohort is client ids '
        f'joined by {client_ids_lib.COHORT_SEPARATOR!r}, none empty): '
        + ', '.join(repr(_cut(v)) for v in empty[:5])
      )
    unknown = sorted(set(users) - self._client_ids)
    if unknown:
      return (
        f'{len(unknown)} client id(s) are not held by silo '
        f'{self._silo}: {", ".join(_cut(u) for u in unknown[:5])}'
      )
    repeated = sorted(u for u, n in collections.Counter(users).items() if n > 1)
    if repeated:
      return (
        'client ids repeat within one aggregate (within or across its cohorts: '
        f'{", ".join(repeated[:5])}): each client counts once'
      )
    if len(users) < self.policy.min_clients_per_aggregate:
      cohorts = f' (in {len(values)} cohorts)' if len(values) != len(users) else ''
      return (
        f"{len(users)} client(s){cohorts} in one aggregate; this silo's policy needs at "
        f'least min_clients_per_aggregate={self.policy.min_clients_per_aggregate}'
      )
    return None

  def _check_call(self, request, caller: str) -> str | None:
    """Any call of an approved computation needs budget left; its charge waits for release."""
    with self._lock:
      values = self._values.get(request.executor.id, {})
      function = values.get(request.function_ref.id)
    # Only computations of approved studies get a fingerprint here (`_check_value`).
    if function is None or function.fingerprint is None:
      return self._refuse(caller, 'the called function is not an approved computation')
    argument = (
      self._lineage(request.executor.id, [request.argument_ref.id])
      if request.HasField('argument_ref')
      else _ValueInfo()
    )
    with self._charge_lock:
      choice = self._choose_study(function.fingerprint, caller)
      if isinstance(choice, str):
        return self._refuse(caller, choice, fingerprint=function.fingerprint)
      study, role = choice
      with self._lock:
        key = self._next_reservation
        self._next_reservation += 1
        self._reservations[key] = _Reservation(
          study_id=study.study_id,
          fingerprint=function.fingerprint,
          role=role,
          caller=caller,
          executor_id=request.executor.id,
          clients=tuple(sorted(argument.clients)),
        )
    self._stage(request, _ValueInfo(clients=argument.clients, pending=argument.pending | {key}))
    return None

  def _choose_study(self, fp: str, caller: str):
    """The oldest approved study of `caller` with a call of `fp` left, and its role.

    Returns:
      (study, role), or why none can pay for the call.
    """
    candidates = self.store.approved_computations(caller).get(fp, [])
    reasons = []
    for study_id, role in candidates:
      study = self.store.get(study_id)
      if role == governance_store.ROLE_TRAIN:
        left = study.rounds_remaining
        kind = 'rounds'
      else:
        left = study.evaluations_remaining
        kind = 'evaluations'
      # Calls in flight are not counted: a coordinator that dies mid-round
      # leaves calls that will never be released. Two calls racing for the
      # last one both run; the second one's result is withheld when charged.
      if left > 0:
        return study, role
      reasons.append(
        f'study {study_id} has used all {getattr(study, kind + "_approved")} approved {kind}'
        f'; its data owner can add more with `fedpipe-governance extend {study_id} '
        f'--{kind}=N`'
      )
    return '; '.join(reasons) or f'computation {computation_fingerprint.short(fp)} is not approved'

  def _charge(self, pending: frozenset[int], caller: str) -> str | None:
    """Charges every uncharged call behind a value before it leaves the silo."""
    del caller
    with self._charge_lock:
      with self._lock:
        if any(k not in self._reservations for k in pending):
          return 'its executor was disposed while it was computed; it is not released'
        due = [self._reservations[k] for k in sorted(pending) if not self._reservations[k].charged]
      for r in due:
        try:
          detail = self._charge_detail(r)
          study = self.store.charge(
            r.study_id, fingerprint=r.fingerprint, caller=r.caller, clients=r.clients, detail=detail
          )
          r.charged = True
        except (governance_store.GovernanceError, _LifetimeExceededError) as e:
          return self._refuse(
            r.caller, f'result withheld: {e}', study_id=r.study_id, fingerprint=r.fingerprint
          )
        LOG.info(
          json.dumps(
            {
              'event': 'call_charged',
              'silo': self._silo,
              'study': r.study_id,
              'role': r.role,
              'rounds_used': study.rounds_used,
              'evaluations_used': study.evaluations_used,
              'clients': len(r.clients),
              **detail,
            }
          )
        )
    return None

  def _charge_detail(self, r: _Reservation) -> dict[str, Any]:
    """The privacy cost of one more call, recomputed here from the study's approved terms."""
    if r.role != governance_store.ROLE_TRAIN:
      return {'unnoised_release': True}
    study = self.store.get(r.study_id)
    privacy = study.request['privacy']
    if _noise_free_lab_study(privacy, self.policy):
      return {'mechanism': secure_terms.NOISE, 'noise_free_test_mode': True}
    rounds = study.rounds_used + 1
    epsilon = privacy_ledger.study_epsilon(privacy, rounds, delta=self.policy.delta)
    ledger = [
      row
      for row in self.store.ledger()
      if row['study_id'] != r.study_id and not _noise_free_lab_study(row['privacy'], self.policy)
    ]
    spent = privacy_ledger.ledger_epsilons(
      ledger, delta=self.policy.delta, extra=[(privacy, rounds)]
    )['spent']
    if spent > self.policy.max_lifetime_epsilon * (1 + 1e-9):
      raise _LifetimeExceededError(
        f'one more round of study {r.study_id} would bring the lifetime epsilon spent on '
        f"this silo's data to {spent:.4g}, above max_lifetime_epsilon "
        f'{self.policy.max_lifetime_epsilon:g}'
      )
    detail = {
      'epsilon': round(epsilon, 6),
      'lifetime_epsilon': round(spent, 6),
      'delta': self.policy.delta,
    }
    terms = secure_terms.terms_of(privacy)
    if terms is not None:
      detail.update(
        mechanism=terms.noise,
        silos=len(terms.roster),
        max_colluding=terms.max_colluding,
        bits=terms.bits,
        scale=terms.scale,
      )
    return detail

  # Study requests (fedpipe.Silo's SubmitStudy and StudyStatus).

  def submit_study(
    self, request: study_request.StudyRequest, caller: str
  ) -> governance_store.Study:
    """Reviews and stores a study request (idempotent: a known study is returned as stored).

    Raises:
      silo_policy.PolicyRefusalError: If the caller may not use this silo.
    """
    self.policy.check_caller(caller)
    other_roles = self.store.roles_of([c.fingerprint for c in request.computations])
    review = review_study(
      request,
      self.policy,
      silo_clients=len(self._client_ids),
      other_roles=other_roles,
      silo_name=self._silo,
    )
    study = self.store.submit(
      study_id=request.study_id,
      caller=caller,
      name=request.name,
      request=request.to_json(),
      review=review,
      roles={c.fingerprint: c.role for c in request.computations},
    )
    LOG.info(
      json.dumps(
        {
          'event': 'study_submitted',
          'silo': self._silo,
          'caller': caller,
          'study': study.study_id,
          'status': study.status,
        }
      )
    )
    return study

  def study_status(self, study_id: str, caller: str) -> governance_store.Study:
    """The study `study_id` that `caller` submitted.

    Raises:
      silo_policy.PolicyRefusalError: If the caller may not use this silo.
      governance_store.UnknownStudyError: If the caller submitted no such
        study (another caller's study is as unknown as a study never sent).
    """
    self.policy.check_caller(caller)
    study = self.store.get(study_id)
    if study is None or study.caller != caller:
      raise governance_store.UnknownStudyError(
        f'no study {study_id} was submitted by {caller!r}; submit it first (SubmitStudy)'
      )
    return study

  # Statistics studies (fedpipe.Silo's SubmitStatisticsStudy and ReleaseStatistics).

  def _require_raw_data(self) -> None:
    if self._statistics is None:
      raise StatisticsUnavailableError(
        f'silo {self._silo} has no raw data to compute statistics on: its data owner starts '
        'it with --raw_data=<glob of CSV/JSONL files> (and --raw_format=csv|jsonl) to take '
        'statistics studies'
      )

  def submit_statistics_study(
    self, query: statistics_query.StatisticsQuery, caller: str
  ) -> governance_store.Study:
    """Reviews and stores a statistics study (idempotent, like `submit_study`).

    Raises:
      silo_policy.PolicyRefusalError: If the caller may not use this silo.
      StatisticsUnavailableError: If the silo has no raw data.
    """
    self.policy.check_caller(caller)
    self._require_raw_data()
    study = self.store.submit(
      study_id=query.study_id,
      caller=caller,
      name=query.name,
      request=query.to_json(),
      review=review_statistics_study(query, self.policy),
      roles={query.fingerprint: governance_store.ROLE_STATISTICS},
    )
    LOG.info(
      json.dumps(
        {
          'event': 'statistics_study_submitted',
          'silo': self._silo,
          'caller': caller,
          'study': study.study_id,
          'status': study.status,
        }
      )
    )
    return study

  def _refuse_statistics(self, caller: str, study_id: str, reason: str, **detail) -> None:
    fingerprint = detail.pop('fingerprint', None)
    self._refuse(caller, reason, study_id=study_id, fingerprint=fingerprint, **detail)
    raise silo_policy.PolicyRefusalError(reason)

  def release_statistics(
    self, study_id: str, sent: statistics_query.StatisticsQuery, caller: str
  ) -> dict[str, Any]:
    """Computes, noises, charges and audits one release of an approved statistics study.

    Everything the caller sends is a claim: the query must be the one the
    data owner approved, word for word (bounds, bins, limits, noise); the
    statistics are computed for the stored query, never the sent one; the
    release is refused when the study has no release left, no longer fits
    the policy, or would pass the lifetime ε. The charge and its audit entry
    (ε, lifetime ε, the data's row and malformed-row counts) are written
    before the noised values are returned.

    Returns:
      `{'study_id', 'release': the noised statistics (mechanism.release),
      'release_number', 'epsilon', 'delta'}`.

    Raises:
      silo_policy.PolicyRefusalError: If the caller or the release is refused.
      governance_store.UnknownStudyError: If the caller submitted no such study.
      StatisticsUnavailableError: If the silo has no raw data or its pipeline failed.
    """
    self.policy.check_caller(caller)
    self._require_raw_data()
    study = self.store.get(study_id)
    if study is None or study.caller != caller:
      raise governance_store.UnknownStudyError(
        f'no study {study_id} was submitted by {caller!r}; submit it first (SubmitStatisticsStudy)'
      )
    if not statistics_query.is_statistics_request(study.request):
      self._refuse_statistics(
        caller, study_id, f'study {study_id} is not a statistics study; it releases no statistics'
      )
    approved = statistics_query.StatisticsQuery.from_json(study.request)
    if study.status != governance_store.APPROVED:
      self._refuse_statistics(
        caller,
        study_id,
        f'statistics study {study_id} is {study.status}; its data owner reviews it with '
        f'`fedpipe-governance show {study_id}`',
        fingerprint=approved.fingerprint,
      )
    differences = approved.differences(sent)
    if differences:
      self._refuse_statistics(
        caller,
        study_id,
        f'the query sent differs from the one approved in study {study_id}: '
        + '; '.join(differences[:10])
        + '. Nothing was computed; submit the new query as a study of its own',
        fingerprint=approved.fingerprint,
      )
    with self._statistics_lock:  # One release at a time: the budget check holds until charged.
      study = self.store.get(study_id)
      if study.rounds_remaining <= 0:
        self._refuse_statistics(
          caller,
          study_id,
          f'study {study_id} has used all {study.rounds_approved} approved releases; its data '
          f'owner can add more with `fedpipe-governance extend {study_id} --rounds=N`',
          fingerprint=approved.fingerprint,
        )
      violations = review_statistics_study(approved, self.policy)['violations']
      if violations:
        self._refuse_statistics(
          caller,
          study_id,
          f"statistics study {study_id} no longer fits this silo's policy: "
          + '; '.join(violations),
          fingerprint=approved.fingerprint,
        )
      try:
        detail = self._statistics_charge_detail(study, approved)
      except _LifetimeExceededError as e:
        self._refuse_statistics(
          caller, study_id, f'release withheld: {e}', fingerprint=approved.fingerprint
        )
      try:
        exact = self._statistics(approved)
      except FedpipeError as e:
        LOG.error(
          json.dumps(
            {'event': 'statistics_failed', 'silo': self._silo, 'study': study_id, 'error': str(e)}
          )
        )
        raise StatisticsUnavailableError(
          f"the statistics pipeline failed on silo {self._silo}'s raw data; nothing was "
          "released or charged. Its data owner finds why in the silo's log"
        ) from None
      released = statistics_mechanism.release(exact, approved)
      try:
        study = self.store.charge(
          study_id,
          fingerprint=approved.fingerprint,
          caller=caller,
          clients=[],
          detail=dict(detail, **exact.data_quality),
        )
      except governance_store.GovernanceError as e:
        self._refuse_statistics(
          caller, study_id, f'release withheld: {e}', fingerprint=approved.fingerprint
        )
    LOG.info(
      json.dumps(
        {
          'event': 'statistics_released',
          'silo': self._silo,
          'study': study_id,
          'releases_used': study.rounds_used,
          **detail,
          **exact.data_quality,
        }
      )
    )
    return {
      'study_id': study_id,
      'release_number': study.rounds_used,
      'epsilon': detail.get('epsilon'),
      'delta': self.policy.delta,
      'release': released,
    }

  def _statistics_charge_detail(
    self, study: governance_store.Study, query: statistics_query.StatisticsQuery
  ) -> dict[str, Any]:
    """ε of one more release, recomputed here; raises `_LifetimeExceededError` past the policy."""
    privacy = query.privacy
    base = {
      'mechanism': statistics_query.MECHANISM,
      'noise_multiplier': query.noise_multiplier,
      'threshold_delta': query.threshold_delta,
    }
    if _noise_free_lab_study(privacy, self.policy):
      return dict(base, noise_free_test_mode=True)
    releases = study.rounds_used + 1
    epsilon = privacy_ledger.study_epsilon(privacy, releases, delta=self.policy.delta)
    ledger = [
      row
      for row in self.store.ledger()
      if row['study_id'] != study.study_id
      and not _noise_free_lab_study(row['privacy'], self.policy)
    ]
    spent = privacy_ledger.ledger_epsilons(
      ledger, delta=self.policy.delta, extra=[(privacy, releases)]
    )['spent']
    if spent > self.policy.max_lifetime_epsilon * (1 + 1e-9):
      raise _LifetimeExceededError(
        f'one more release of study {study.study_id} would bring the lifetime epsilon spent '
        f"on this silo's data to {spent:.4g}, above max_lifetime_epsilon "
        f'{self.policy.max_lifetime_epsilon:g}'
      )
    return dict(
      base, epsilon=round(epsilon, 6), lifetime_epsilon=round(spent, 6), delta=self.policy.delta
    )


def _cut(text: str, limit: int = 80) -> str:
  """`text` cut to `limit` characters for a message (a hostile caller chooses it)."""
  return text if len(text) <= limit else text[: limit - 3] + '...'


class _LifetimeExceededError(RuntimeError):
  """One more charge would exceed the policy's lifetime ε."""
