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
import dataclasses
import hashlib
import json
from typing import Any

from tensorflow_federated.proto.v0 import computation_pb2

from fedpipe.errors import FedpipeError
from fedpipe.governance import fingerprint as computation_fingerprint
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
      'model': self.model,
      'privacy': self.privacy,
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
      StudyRequestError: If a field is missing or malformed, or a stated
        fingerprint does not match its computation.
    """
    try:
      if data.get('format') != FORMAT:
        raise StudyRequestError(f'unknown study format {data.get("format")!r}; expected {FORMAT}')
      computations = []
      for item in data['computations']:
        if item['role'] not in ROLES:
          raise StudyRequestError(f'unknown computation role {item["role"]!r}')
        proto = computation_pb2.Computation.FromString(base64.b64decode(item['proto']))
        computation = StudyComputation(role=item['role'], proto=proto)
        if item.get('fingerprint') not in (None, computation.fingerprint):
          raise StudyRequestError(
            f'the {item["role"]} computation does not match its stated fingerprint'
          )
        computations.append(computation)
      privacy = {k: data['privacy'][k] for k in _PRIVACY_KEYS}
      rounds = int(data['rounds'])
      evaluations = int(data.get('evaluations', 0))
      if rounds < 1 or evaluations < 0:
        raise StudyRequestError(
          f'rounds must be >= 1 and evaluations >= 0, got {rounds} and {evaluations}'
        )
      name = str(data['name'])
      model = dict(data['model'])
    except StudyRequestError:
      raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise StudyRequestError(f'malformed study request: {type(e).__name__}: {e}') from e
    if not computations:
      raise StudyRequestError('a study request must contain at least one computation')
    return cls(
      name=name,
      computations=tuple(computations),
      model=model,
      privacy=privacy,
      rounds=rounds,
      evaluations=evaluations,
    )
