"""A silo's side of a secure-aggregation round: keys, roster confirmation, masked release.

For a study approved with secure-aggregation terms (`governance.secure_terms`)
the training result of a round leaves the silo only through these three
calls, in order, each checked as if the coordinator were hostile:

1. `keys` (SecureKeys): a fresh X25519 key for (study, round, attempt),
   signed with this silo's certificate key. The round roster must be part of
   the study's roster, include this silo and be large enough for the policy
   and the colluders assumed, and its noised sum must fit the ring
   (`secure_sum.check_range`); (round, attempt) must be newer than any this
   silo has keyed for the study (recorded in its audit log, so across
   restarts too), so an old round cannot be replayed.
2. `confirm` (SecureConfirm): the relayed bundles are verified
   (`key_agreement.verify_bundles`; this silo's own bundle must come back as
   it was sent) and this silo signs the digest of the roster it saw.
3. `release` (SecureRelease): every roster silo's signature on that same
   digest is checked; the named value must carry this study's training
   result; it is computed through the governance gate (which charges the
   round before anything leaves), then encoded, noised with this silo's
   share and masked (`secure_sum`). The round's keys are then forgotten.

Noise shares come from the study's approved terms, never from the request:
with fewer silos in a round each share grows, so the honest shares still
carry the study's noise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from tensorflow_federated.proto.v0 import executor_pb2

from fedpipe.computations import discrete_gaussian
from fedpipe.federation import key_agreement, secure_sum, silo_protocol
from fedpipe.federation import tls as tls_lib
from fedpipe.governance import gate as governance_gate
from fedpipe.governance import store as governance_store

LOG = logging.getLogger('fedpipe.silo')

Compute = Callable[[executor_pb2.ComputeRequest, str], executor_pb2.ComputeResponse]
"""Runs a Compute call on the silo's worker through its gate, for a caller."""


@dataclasses.dataclass
class _Round:
  keys: key_agreement.RoundKeys
  roster: tuple[str, ...]
  caller: str
  verified: list[key_agreement.KeyBundle] | None = None
  digest: bytes | None = None


class SecureRounds:
  """The secure-aggregation rounds of one silo (see the module docstring)."""

  def __init__(
    self,
    *,
    gate: governance_gate.GovernanceGate,
    silo_name: str,
    tls: tls_lib.TlsFiles,
    compute: Compute,
  ):
    self._gate = gate
    self._silo = silo_name
    with open(tls.cert, 'rb') as f:
      self._cert = f.read()
    with open(tls.key, 'rb') as f:
      self._key = f.read()
    with open(tls.ca, 'rb') as f:
      self._ca = f.read()
    self._compute = compute
    self._lock = threading.Lock()
    self._rounds: dict[tuple[str, int, int], _Round] = {}

  def _error(self, message: str) -> key_agreement.SecureAggregationError:
    return key_agreement.SecureAggregationError(message, silo=self._silo)

  def _study(self, study_id: str, caller: str) -> governance_store.Study:
    study = self._gate.study_status(study_id, caller)
    if study.status != governance_store.APPROVED:
      raise self._error(f'study {study_id} is {study.status}, not approved')
    if self._gate.secure_terms(study_id) is None:
      raise self._error(f'study {study_id} was not approved with secure aggregation')
    return study

  def keys(self, request: silo_protocol.SecureRoundRequest, caller: str) -> key_agreement.KeyBundle:
    """Step 1: this silo's signed key for the round."""
    study = self._study(request.study_id, caller)
    terms = self._gate.secure_terms(request.study_id)
    roster = tuple(sorted(set(request.roster)))
    outside = sorted(set(roster) - set(terms.roster))
    if outside or self._silo not in roster or len(roster) != len(request.roster):
      raise self._error(
        f'round roster {list(request.roster)} must be distinct silos of the study roster '
        f'{list(terms.roster)} including {self._silo}'
      )
    fewest = max(self._gate.policy.min_secure_roster, terms.max_colluding + 1, 2)
    if len(roster) < fewest:
      raise self._error(
        f'a round of {len(roster)} silos is below the {fewest} this silo needs '
        f'(min_roster {self._gate.policy.min_secure_roster}, '
        f'{terms.max_colluding} colluders assumed)'
      )
    # Checked before any key is made: the noised sum of the round cannot wrap.
    clip_norm = float(study.request['privacy']['clip_norm'])
    secure_sum.check_range(
      clip_norm=clip_norm,
      max_users_per_silo=self._gate.client_count,
      num_silos=len(roster),
      scale=terms.scale,
      local_stddev=terms.local_stddev(clip_norm, len(roster)),
    )
    train = [c['fingerprint'] for c in study.request['computations'] if c['role'] == 'train_round']
    context = key_agreement.RoundContext(
      study_id=request.study_id, round=request.round, attempt=request.attempt, fingerprint=train[0]
    )
    with self._lock:
      try:  # In the audit log: a restart does not reopen old rounds.
        self._gate.store.claim_secure_round(
          request.study_id, request.round, request.attempt, roster, caller
        )
      except governance_store.GovernanceError as e:
        raise self._error(str(e)) from e
      for key in [k for k in self._rounds if k[0] == request.study_id]:
        del self._rounds[key]  # An unfinished older round can never be released.
      keys = key_agreement.RoundKeys(
        silo=self._silo, context=context, tls_cert_pem=self._cert, tls_key_pem=self._key
      )
      self._rounds[(request.study_id, request.round, request.attempt)] = _Round(
        keys=keys, roster=roster, caller=caller
      )
    self._log('secure_keys', request, caller, roster=list(roster))
    return keys.bundle

  def _round(self, study_id: str, round_number: int, attempt: int, caller: str) -> _Round:
    with self._lock:
      state = self._rounds.get((study_id, round_number, attempt))
    if state is None or state.caller != caller:
      raise self._error(
        f'no keys for study {study_id} round {round_number} attempt {attempt} '
        '(never made, superseded, or already released)'
      )
    return state

  def confirm(
    self, request: silo_protocol.SecureConfirmRequest, caller: str
  ) -> silo_protocol.SecureConfirmReply:
    """Step 2: verifies the relayed bundles; signs the digest of the roster seen."""
    state = self._round(request.study_id, request.round, request.attempt, caller)
    verified = key_agreement.verify_bundles(
      request.bundles, context=state.keys.context, roster=state.roster, ca_cert_pem=self._ca
    )
    own = next(b for b in verified if b.silo == self._silo)
    if own != state.keys.bundle:
      raise self._error(f'the coordinator relayed a key for {self._silo} that it did not make')
    state.verified = verified
    state.digest = key_agreement.roster_digest(verified)
    return silo_protocol.SecureConfirmReply(state.keys.sign_roster(state.digest))

  def release(
    self, request: silo_protocol.SecureReleaseRequest, caller: str
  ) -> silo_protocol.SecureReleaseReply:
    """Step 3: the masked, noised partial aggregate (the round is charged first)."""
    state = self._round(request.study_id, request.round, request.attempt, caller)
    if state.digest is None:
      raise self._error('the roster was not confirmed (SecureConfirm) before the release')
    key_agreement.verify_roster_confirmations(
      request.confirmations,
      bundles=state.verified,
      context=state.keys.context,
      digest=state.digest,
    )
    with self._lock:  # One release per round's keys, whatever follows.
      if self._rounds.pop((request.study_id, request.round, request.attempt), None) is None:
        raise self._error('this round was already released')
    if not self._gate.claim_training_result(
      request.executor_id, request.value_ref, request.study_id
    ):
      raise self._error(
        f'value {request.value_ref} does not carry a training result of study {request.study_id}'
      )
    terms = self._gate.secure_terms(request.study_id)
    study = self._gate.study_status(request.study_id, caller)
    clip_norm = float(study.request['privacy']['clip_norm'])
    with self._gate.releasing_masked():
      response = self._compute(
        executor_pb2.ComputeRequest(
          executor=executor_pb2.ExecutorId(id=request.executor_id),
          value_ref=executor_pb2.ValueRef(id=request.value_ref),
        ),
        caller,
      )
    leaves = _leaves(response.value)
    noised = tuple(path[: len(terms.noised_path)] == terms.noised_path for path, _ in leaves)
    tensors = [np.asarray(t) for _, t in leaves]
    count = sum(t.size for t, flag in zip(tensors, noised) if flag)
    if count != terms.dim:
      raise self._error(
        f'the training result has {count} values at noised_path {list(terms.noised_path)}; '
        f'the study was approved for {terms.dim}'
      )
    spec = secure_sum.EncodingSpec(
      scale=terms.scale,
      local_stddev=terms.local_stddev(clip_norm, len(state.roster)),
      noised=noised,
      num_silos=len(state.roster),
    )
    encoded, layout = secure_sum.encode_partial(tensors, spec, discrete_gaussian.CryptoRandom())
    seeds = state.keys.pairwise_seeds(state.verified)
    masked = secure_sum.add_mask(encoded, key_agreement.mask_vector(self._silo, seeds, layout.size))
    self._log(
      'secure_release',
      request,
      caller,
      roster=list(state.roster),
      local_stddev=round(spec.local_stddev, 3),
      values=layout.size,
    )
    return silo_protocol.SecureReleaseReply(
      vector=masked.astype('<u8').tobytes(), shapes=layout.shapes, dtypes=layout.dtypes
    )

  def _log(self, event: str, request, caller: str, **detail: Any) -> None:
    LOG.info(
      json.dumps(
        {
          'event': event,
          'silo': self._silo,
          'caller': caller,
          'study': request.study_id,
          'round': request.round,
          'attempt': request.attempt,
          **detail,
        }
      )
    )


def _leaves(value_proto: executor_pb2.Value) -> list[tuple[tuple[int, ...], Any]]:
  """The tensors of a computed value, each with its index path, in order."""
  import tensorflow_federated as tff

  value, type_spec = tff.framework.deserialize_value(value_proto)
  if isinstance(type_spec, tff.FederatedType) and isinstance(value, list) and len(value) == 1:
    value = value[0]  # The SERVER-placed result's one member.
  found: list[tuple[tuple[int, ...], Any]] = []

  def walk(node, path):
    if isinstance(node, tff.structure.Struct):
      for i, element in enumerate(tff.structure.iter_elements(node)):
        walk(element[1], (*path, i))
    elif isinstance(node, (list, tuple)) and not isinstance(node, np.ndarray):
      for i, element in enumerate(node):
        walk(element, (*path, i))
    elif isinstance(node, dict):
      for i, element in enumerate(node.values()):
        walk(element, (*path, i))
    else:
      found.append((path, node))

  walk(value, ())
  return found
