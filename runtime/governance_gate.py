"""Enforces a silo's policy on every executor call, before it reaches the worker.

The `CallGate` of a governed silo server. For each call from a coordinator it
checks, in order:

* the caller's certificate name is in the policy's `allowed_callers`;
* every computation sent (`CreateValue`) has the fingerprint of a
  computation in a study approved for this caller, so nothing unapproved is
  ever loaded by the worker, let alone run on data;
* client ids sent are ids this silo holds, at least
  `min_clients_per_aggregate` of them at once;
* a clipping norm sent in the server state does not exceed `max_clip_norm`;
* a call (`CreateCall`) of an approved training computation is charged to
  its study's round budget in the durable ledger first, and refused when the
  budget is spent; every executed computation is audited with its clients.

It also serves the study-request methods of `fedpipe.Silo` (`SubmitStudy`,
`StudyStatus`), through which coordinators ask for approval.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import threading
from collections.abc import Iterable
from typing import Any, Optional

from tensorflow_federated.proto.v0 import executor_pb2

from computations import privacy_accounting
from runtime import computation_fingerprint
from runtime import governance_store
from runtime import silo_policy
from runtime import study_request

LOG = logging.getLogger('fedpipe.silo')
_MAX_TRACKED_EXECUTORS = 64


@dataclasses.dataclass(frozen=True)
class _ValueInfo:
  """What the gate knows about a value on the worker."""

  fingerprint: Optional[str] = None
  study_id: Optional[str] = None
  role: Optional[str] = None
  clients: frozenset[str] = frozenset()


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
    if uri == 'clients' and members and all(
        m.WhichOneof('value') == 'array' and m.array.HasField('string_list') for m in members):
      yield 'client_ids', [s.decode('utf-8', 'replace') for m in members
                           for s in m.array.string_list.value]
    for member in members:
      yield from _walk(member, name, uri)
  elif kind == 'array' and name == 'l2_norm_clip' and value.array.float32_list.value:
    yield 'clip_norm', float(value.array.float32_list.value[0])


def review_study(request: study_request.StudyRequest, policy: silo_policy.SiloPolicy,
                 *, silo_clients: int) -> dict[str, Any]:
  """The silo's own reading of a request: recomputed ε, descriptions, violations."""
  privacy = request.privacy
  violations = []
  try:
    sampling = privacy_accounting.SamplingScheme(
        method=privacy['sampling'], population_size=int(privacy['population_size']),
        clients_per_round=int(privacy['clients_per_round']))
    epsilon = privacy_accounting.compute_epsilon(
        noise_multiplier=float(privacy['noise_multiplier']), sampling=sampling,
        rounds=request.rounds, delta=policy.delta,
        accountant=privacy.get('accountant') or 'rdp')
  except (privacy_accounting.PrivacyAccountingError, TypeError, ValueError) as e:
    epsilon = float('inf')
    violations.append(f'privacy parameters cannot be accounted for: {e}')
  violations += policy.violations(
      epsilon=epsilon, noise_multiplier=float(privacy['noise_multiplier'] or 0.0),
      clipping=str(privacy['clipping']), clip_norm=float(privacy['clip_norm'] or 0.0),
      rounds=request.rounds, clients_per_round=int(privacy['clients_per_round']))
  if int(privacy['population_size']) < silo_clients:
    violations.append(f'population_size {privacy["population_size"]} is smaller than this '
                      f"silo's {silo_clients} clients: the sampling rate would be understated")
  return {
      'epsilon_at_policy_delta': epsilon if epsilon != float('inf') else None,
      'policy_delta': policy.delta,
      'silo_clients': silo_clients,
      'stated_epsilon': privacy.get('epsilon'),
      'violations': violations,
      'computations': [dict(role=c.role, fingerprint=c.fingerprint,
                            **study_request.describe_computation(c.proto))
                       for c in request.computations],
  }


class GovernanceGate:
  """A silo's policy and governance state, applied to executor calls."""

  def __init__(self, policy: silo_policy.SiloPolicy, store: governance_store.GovernanceStore,
               *, client_ids: Iterable[str], silo_name: str):
    self.policy = policy
    self.store = store
    self._client_ids = frozenset(client_ids)
    self._silo = silo_name
    self._lock = threading.Lock()
    self._values: collections.OrderedDict[str, dict[str, _ValueInfo]] = (
        collections.OrderedDict())
    self._pending: collections.OrderedDict[int, _ValueInfo] = collections.OrderedDict()
    self._fingerprints: dict[bytes, str] = {}

  # CallGate.

  def check(self, method: str, request, caller: str) -> Optional[str]:
    if not self.policy.allows_caller(caller):
      return (f'caller {caller!r} is not allowed by this silo\'s policy '
              f'({self.policy.source}: allowed_callers)')
    if method == 'CreateValue':
      return self._check_value(request, caller)
    if method == 'CreateCall':
      return self._check_call(request, caller)
    if method == 'CreateStruct':
      refs = [e.value_ref.id for e in request.element]
      self._stage(request, _ValueInfo(clients=self._clients_of(request.executor.id, refs)))
    elif method == 'CreateSelection':
      self._stage(request, _ValueInfo(
          clients=self._clients_of(request.executor.id, [request.source_ref.id])))
    return None

  def on_forwarded(self, method: str, request, response, caller: str) -> None:
    del caller
    if method == 'GetExecutor':
      with self._lock:
        self._values[response.executor.id] = {}
        while len(self._values) > _MAX_TRACKED_EXECUTORS:
          self._values.popitem(last=False)
    elif method == 'DisposeExecutor':
      with self._lock:
        self._values.pop(request.executor.id, None)
    elif method in ('CreateValue', 'CreateCall', 'CreateStruct', 'CreateSelection'):
      with self._lock:
        info = self._pending.pop(id(request), None)
        if info is not None:
          self._values.setdefault(request.executor.id, {})[response.value_ref.id] = info

  # Checks.

  def _stage(self, request, info: _ValueInfo) -> None:
    with self._lock:
      self._pending[id(request)] = info
      while len(self._pending) > 10_000:
        self._pending.popitem(last=False)

  def _clients_of(self, executor_id: str, refs: Iterable[str]) -> frozenset[str]:
    with self._lock:
      values = self._values.get(executor_id, {})
      return frozenset().union(*(values[r].clients for r in refs if r in values))

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
    self.store.record('refused', caller=caller, study_id=detail.pop('study_id', None),
                      fingerprint=detail.pop('fingerprint', None),
                      detail=dict(detail, reason=reason))
    return reason

  def _unapproved_reason(self, fp: str, caller: str) -> str:
    known = [s for s in self.store.studies_with(fp) if s.caller == caller]
    short = computation_fingerprint.short(fp)
    if not known:
      return (f'computation {short} is not part of any study submitted by {caller!r}; '
              'it was refused before running. Submit it as a study and have the data owner '
              'approve it')
    states = ', '.join(f'study {s.study_id} is {s.status}' for s in known)
    return f'computation {short} is not approved for {caller!r} ({states})'

  def _check_value(self, request, caller: str) -> Optional[str]:
    info = _ValueInfo()
    approved = None
    for kind, payload in _walk(request.value):
      if kind == 'computation':
        fp = self._fingerprint(payload)
        if approved is None:
          approved = self.store.approved_computations(caller)
        if fp not in approved:
          return self._refuse(caller, self._unapproved_reason(fp, caller), fingerprint=fp)
        study_id, role = approved[fp]
        info = dataclasses.replace(info, fingerprint=fp, study_id=study_id, role=role)
      elif kind == 'client_ids':
        unknown = sorted(set(payload) - self._client_ids)
        if unknown:
          return self._refuse(caller, f'{len(unknown)} client id(s) are not held by silo '
                              f'{self._silo}: {", ".join(unknown[:5])}')
        if len(payload) < self.policy.min_clients_per_aggregate:
          return self._refuse(
              caller, f'{len(payload)} client(s) in one aggregate; this silo\'s policy needs at '
              f'least min_clients_per_aggregate={self.policy.min_clients_per_aggregate}')
        info = dataclasses.replace(info, clients=info.clients | frozenset(payload))
      elif kind == 'clip_norm' and payload > self.policy.max_clip_norm * (1 + 1e-6):
        return self._refuse(caller, f'clipping norm {payload:g} exceeds this silo\'s '
                            f'max_clip_norm {self.policy.max_clip_norm:g}')
    self._stage(request, info)
    return None

  def _check_call(self, request, caller: str) -> Optional[str]:
    with self._lock:
      values = self._values.get(request.executor.id, {})
      function = values.get(request.function_ref.id)
      argument = values.get(request.argument_ref.id) if request.HasField('argument_ref') else None
    # Only computations of approved studies get a fingerprint here (`_check_value`),
    # and an approved study stays approved.
    if function is None or function.fingerprint is None:
      return self._refuse(caller, 'the called function is not an approved computation')
    clients = sorted(argument.clients) if argument else []
    if function.role == study_request.ROLE_TRAIN:
      try:
        round_num = self.store.charge_round(function.study_id, caller=caller,
                                            fingerprint=function.fingerprint, clients=clients)
      except governance_store.BudgetExhaustedError as e:
        return str(e)
      LOG.info(json.dumps({'event': 'round_charged', 'silo': self._silo,
                           'study': function.study_id, 'round': round_num,
                           'clients': len(clients)}))
    else:
      self.store.record('executed', caller=caller, study_id=function.study_id,
                        fingerprint=function.fingerprint,
                        detail={'role': function.role, 'clients': clients})
    self._stage(request, _ValueInfo(clients=frozenset(clients)))
    return None

  # fedpipe.Silo study methods.

  def submit_study(self, payload: bytes, caller: str) -> dict[str, Any]:
    """Stores a study request (idempotent) and returns its status."""
    if not self.policy.allows_caller(caller):
      raise PermissionError(f'caller {caller!r} is not allowed by this silo\'s policy')
    request = study_request.StudyRequest.from_json(json.loads(payload))
    review = review_study(request, self.policy, silo_clients=len(self._client_ids))
    study = self.store.submit(
        study_id=request.study_id, caller=caller, name=request.name, request=request.to_json(),
        review=review, roles={c.fingerprint: c.role for c in request.computations})
    LOG.info(json.dumps({'event': 'study_submitted', 'silo': self._silo, 'caller': caller,
                         'study': study.study_id, 'status': study.status}))
    return study.summary()

  def study_status(self, payload: bytes, caller: str) -> dict[str, Any]:
    if not self.policy.allows_caller(caller):
      raise PermissionError(f'caller {caller!r} is not allowed by this silo\'s policy')
    study_id = json.loads(payload)['study_id']
    study = self.store.get(study_id)
    if study is None or study.caller != caller:
      raise KeyError(f'no study {study_id} from {caller!r}')
    return study.summary()
