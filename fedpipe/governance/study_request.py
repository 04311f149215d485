"""A study request: what a coordinator asks to run on a silo's data, for approval.

The coordinator packages the computations that will run at the silo (the
client-side halves of training and evaluation, serialized), the model, the DP
parameters and the rounds. The silo does not take the coordinator's word for
what the computations are: it recomputes their fingerprints and type
signatures from the serialized protos and recomputes ε with dp-accounting.
A study's id is a hash of its content, so resubmitting the same study (e.g.
when a killed run is restarted) finds the stored one.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import json
from typing import Any

from tensorflow_federated.proto.v0 import computation_pb2

from fedpipe.data import json_fields
from fedpipe.errors import FedpipeError
from fedpipe.governance import fingerprint as computation_fingerprint
from fedpipe.governance import secure_terms
from fedpipe.governance import store as governance_store

FORMAT = 'fedpipe-study/2'
ROLE_TRAIN = governance_store.ROLE_TRAIN
ROLE_EVALUATE = governance_store.ROLE_EVALUATE
ROLES = (ROLE_TRAIN, ROLE_EVALUATE)
_PRIVACY_KEYS = (
  'noise_multiplier',
  'clipping',
  'clip_norm',
  'delta',
  'epsilon',
  'accountant',
  'sampling',
  'population_size',
  'clients_per_round',
)


class StudyRequestError(FedpipeError, ValueError):
  """A study request is malformed; the message says which part."""


@dataclasses.dataclass(frozen=True)
class StudyComputation:
  """One computation of a study, as the silo will receive it."""

  role: str
  proto: computation_pb2.Computation

  @property
  def fingerprint(self) -> str:
    return computation_fingerprint.fingerprint(self.proto)


@dataclasses.dataclass(frozen=True)
class StudyRequest:
  """What runs, on what terms (see the module docstring)."""

  name: str
  computations: tuple[StudyComputation, ...]
  model: dict[str, Any]
  privacy: dict[str, Any]
  rounds: int
  evaluations: int = 0  # Calls of the evaluation computation the run makes.

  def identity(self) -> dict[str, Any]:
    """The content the study id hashes: fingerprints, not protos."""
    return {
      'format': FORMAT,
      'name': self.name,
      'rounds': self.rounds,
      'evaluations': self.evaluations,
      'computations': sorted([c.role, c.fingerprint] for c in self.computations),
      'model': self.model,
      'privacy': self.privacy,
    }

  @property
  def study_id(self) -> str:
    canonical = json.dumps(self.identity(), sort_keys=True, separators=(',', ':'))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]

  def to_json(self) -> dict[str, Any]:
    return {
      'format': FORMAT,
      'name': self.name,
      'rounds': self.rounds,
      'evaluations': self.evaluations,
      'model': copy.deepcopy(self.model),
      'privacy': copy.deepcopy(self.privacy),
      'computations': [
        {
          'role': c.role,
          'fingerprint': c.fingerprint,
          'proto': base64.b64encode(c.proto.SerializeToString()).decode(),
        }
        for c in self.computations
      ],
    }

  @classmethod
  def from_json(cls, data: Any) -> StudyRequest:
    """Parses a request; fingerprints are recomputed, not read.

    Raises:
      StudyRequestError: Naming the field that is missing or malformed, the
        computation that is not one, or the one that does not match its
        stated fingerprint.
    """
    data = json_fields.require_object(data, _WHAT, StudyRequestError)
    if data.get('format') != FORMAT:
      raise StudyRequestError(f'unknown study format {data.get("format")!r}; expected {FORMAT}')
    items = _field(data, 'computations', list)
    if not items:
      raise StudyRequestError('a study request must contain at least one computation')
    computations = tuple(_computation(item, f'computations[{i}]') for i, item in enumerate(items))
    privacy = _field(data, 'privacy', dict)
    terms = {}
    if privacy.get('secure_aggregation') is not None:
      try:
        parsed = secure_terms.SecureAggregationTerms.from_json(privacy['secure_aggregation'])
      except secure_terms.SecureTermsError as e:
        raise StudyRequestError(f'{_WHAT} field privacy.{e}') from e
      terms = {'secure_aggregation': parsed.to_json()}
    return cls(
      name=str(_field(data, 'name', object)),
      computations=computations,
      model=_field(data, 'model', dict),
      privacy={k: _field(privacy, k, object, within='privacy') for k in _PRIVACY_KEYS} | terms,
      rounds=_count(data, 'rounds', minimum=1),
      evaluations=_count(data, 'evaluations', minimum=0, default=0),
    )


_WHAT = 'the study request'


def _field(data: dict[str, Any], key: str, kind: type, *, within: str = '') -> Any:
  return json_fields.field(data, key, kind, what=_WHAT, error=StudyRequestError, within=within)


def _count(data: dict[str, Any], key: str, *, minimum: int, default: int | None = None) -> int:
  """`data[key]`, a whole number >= `minimum` (`default` if absent and not None)."""
  if key not in data and default is not None:
    return default
  value = _field(data, key, int)
  if value < minimum:
    raise StudyRequestError(f'{_WHAT} field {key} must be >= {minimum}, got {value}')
  return value


def _computation(item: Any, name: str) -> StudyComputation:
  """One entry of a request's `computations`, its proto parsed and its fingerprint checked."""
  item = json_fields.require_object(item, f'{_WHAT} field {name}', StudyRequestError)
  role = _field(item, 'role', str, within=name)
  if role not in ROLES:
    raise StudyRequestError(
      f'{_WHAT} field {name}.role is {role!r}, not a computation role ({", ".join(ROLES)})'
    )
  encoded = _field(item, 'proto', str, within=name)
  import tensorflow_federated as tff  # Seconds to import: only where requests are read.

  try:
    proto = computation_pb2.Computation.FromString(base64.b64decode(encoded, validate=True))
    tff.framework.deserialize_computation(proto)  # Its type signature must be readable.
    computation = StudyComputation(role=role, proto=proto)
    fingerprint = computation.fingerprint
  # Untrusted bytes through protobuf's and TFF's parsers: any failure is the sender's.
  except Exception as e:
    raise StudyRequestError(
      f'{_WHAT} field {name}.proto is not a serialized TFF computation ({type(e).__name__}: {e})'
    ) from e
  stated = item.get('fingerprint')
  if stated is not None and stated != fingerprint:
    raise StudyRequestError(
      f'{_WHAT} field {name} (the {role} computation) does not match its stated fingerprint'
    )
  return computation
