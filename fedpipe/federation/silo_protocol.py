"""The silo protocol: a silo's gRPC services and methods, their JSON payloads, the status of each error.

A silo (`silo_server`) serves, behind its mutual-TLS front (`tls_front`):

* TFF's executor service (`EXECUTOR_SERVICE`, methods `EXECUTOR_METHODS`,
  defined with the runtime in `fedpipe.runtime.executor_service`, where the
  governance gate that judges each call also finds them), relayed to the
  silo's isolated worker;
* `fedpipe.Silo` (`SILO_SERVICE`), whose methods take and return UTF-8 JSON:

      method        request                               reply
      GetManifest   empty                                 `ManifestReply`
      SubmitStudy   `study_request.StudyRequest`          `StudyStatusReply`
      StudyStatus   `StudyStatusRequest`                  `StudyStatusReply`
      SecureKeys    `SecureRoundRequest`                  `key_agreement.KeyBundle`
      SecureConfirm `SecureConfirmRequest`                `SecureConfirmReply`
      SecureRelease `SecureReleaseRequest`                `SecureReleaseReply`
      SubmitStatisticsStudy `statistics.query.StatisticsQuery` `StudyStatusReply`
      ReleaseStatistics `ReleaseStatisticsRequest`        `ReleaseStatisticsReply`

  SubmitStudy, StudyStatus, the statistics methods and the Secure methods (one secure-aggregation
  round, see `secure_rounds`) are served by governed silos only: an
  ungoverned one answers UNIMPLEMENTED;
* gRPC health checks (`grpc.health.v1.Health`) for `HEALTH_SERVICES`.

The silo server decodes requests and encodes replies with this module; the
coordinator (`cross_silo.SiloConnection`) does the reverse. A request the
silo refuses ends with the gRPC status that `status_code` gives its error:

    error                                      status
    PayloadError, study_request.StudyRequestError   INVALID_ARGUMENT (names the field)
    statistics StatisticsQueryError            INVALID_ARGUMENT (names the field)
    key_agreement.SecureAggregationError       FAILED_PRECONDITION (names the silo at fault)
    gate.StatisticsUnavailableError            FAILED_PRECONDITION (no raw data, pipeline failed)
    governance_store.UnknownStudyError         NOT_FOUND (names the study)
    silo_policy.PolicyRefusalError             PERMISSION_DENIED (names the rule)
    any other FedpipeError                     INTERNAL

and a message naming the silo. Errors that are not `FedpipeError`s are bugs:
the silo logs them and answers INTERNAL without their text.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any, NoReturn, Protocol, TypeVar

import grpc

from fedpipe.data import json_fields
from fedpipe.data import manifest as manifest_lib
from fedpipe.errors import FedpipeError
from fedpipe.federation import key_agreement
from fedpipe.governance import gate as governance_gate
from fedpipe.governance import policy as silo_policy
from fedpipe.governance import store as governance_store
from fedpipe.governance import study_request
from fedpipe.runtime import executor_service
from fedpipe.statistics import query as statistics_query

SILO_SERVICE = 'fedpipe.Silo'
GET_MANIFEST = 'GetManifest'
SUBMIT_STUDY = 'SubmitStudy'
STUDY_STATUS = 'StudyStatus'
SECURE_KEYS = 'SecureKeys'
SECURE_CONFIRM = 'SecureConfirm'
SECURE_RELEASE = 'SecureRelease'
SECURE_METHODS = (SECURE_KEYS, SECURE_CONFIRM, SECURE_RELEASE)
"""One secure-aggregation round, in order (see `secure_rounds`)."""
SUBMIT_STATISTICS_STUDY = 'SubmitStatisticsStudy'
RELEASE_STATISTICS = 'ReleaseStatistics'
STATISTICS_METHODS = (SUBMIT_STATISTICS_STUDY, RELEASE_STATISTICS)
SILO_METHODS = (GET_MANIFEST, SUBMIT_STUDY, STUDY_STATUS, *SECURE_METHODS, *STATISTICS_METHODS)
STUDY_METHODS = (SUBMIT_STUDY, STUDY_STATUS, *SECURE_METHODS, *STATISTICS_METHODS)
"""The methods a governed silo serves in addition to GetManifest."""

EXECUTOR_SERVICE = executor_service.SERVICE
EXECUTOR_METHODS = executor_service.METHODS
HEALTH_SERVICES = ('', EXECUTOR_SERVICE, SILO_SERVICE)
"""The service names a silo reports health for ('' is the server as a whole)."""

BUDGETS = ('rounds', 'evaluations')
"""The budgets of a study: training rounds and evaluation calls."""


def method_path(method: str, service: str = SILO_SERVICE) -> str:
  """The gRPC path of `method`, e.g. `/fedpipe.Silo/GetManifest`."""
  return f'/{service}/{method}'


class PayloadError(FedpipeError, ValueError):
  """A `fedpipe.Silo` request or reply is not what the protocol says; the message names the field."""


class _JsonPayload(Protocol):
  def to_json(self) -> Any: ...


_Payload = TypeVar('_Payload')


def _field(data: dict[str, Any], key: str, kind: type, what: str, *, optional: bool = False) -> Any:
  return json_fields.field(data, key, kind, what=what, error=PayloadError, optional=optional)


def _object(data: Any, what: str) -> dict[str, Any]:
  return json_fields.require_object(data, what, PayloadError)


def encode(payload: _JsonPayload) -> bytes:
  """The wire form of a request or reply: its JSON, UTF-8."""
  return json.dumps(payload.to_json()).encode()


def decode(payload_type: type[_Payload], data: bytes, *, what: str) -> _Payload:
  """Parses the wire form of a `payload_type` (a class with `from_json`).

  Args:
    payload_type: `ManifestReply`, `StudyStatusRequest`, `StudyStatusReply`
      or `study_request.StudyRequest`.
    data: The bytes received.
    what: What the bytes are, for messages ('the SubmitStudy request').

  Raises:
    PayloadError: If `data` is not JSON, or `payload_type.from_json`'s error
      for JSON that is not a `payload_type`.
  """
  try:
    value = json.loads(data)
  except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError.
    raise PayloadError(f'{what} is not JSON: {e}') from e
  return payload_type.from_json(value)


@dataclasses.dataclass(frozen=True)
class ManifestReply:
  """GetManifest's reply: the silo's name and what its data directory holds, never records."""

  silo: str
  manifest: manifest_lib.Manifest

  def to_json(self) -> dict[str, Any]:
    served = self.manifest.to_json()
    # The names of raw columns the feature spec ignores stay at the silo.
    preprocessing = served.get('preprocessing')
    if isinstance(preprocessing, dict):
      served['preprocessing'] = {k: v for k, v in preprocessing.items() if k != 'ignored_columns'}
    return {'silo': self.silo, 'manifest': served}

  @classmethod
  def from_json(cls, data: Any) -> ManifestReply:
    """Raises `PayloadError` if `data` is not a GetManifest reply or its manifest is malformed."""
    what = 'the GetManifest reply'
    data = _object(data, what)
    silo = _field(data, 'silo', str, what)
    try:
      manifest = manifest_lib.Manifest.from_json(
        _field(data, 'manifest', dict, what), source=f'{what} of silo {silo!r}'
      )
    except manifest_lib.ManifestError as e:
      raise PayloadError(str(e)) from e
    return cls(silo=silo, manifest=manifest)


@dataclasses.dataclass(frozen=True)
class StudyStatusRequest:
  """StudyStatus's request: which of the caller's studies."""

  study_id: str

  def to_json(self) -> dict[str, Any]:
    return {'study_id': self.study_id}

  @classmethod
  def from_json(cls, data: Any) -> StudyStatusRequest:
    """Raises `PayloadError` naming the field unless `data` is `{"study_id": "<id>"}`."""
    what = 'the StudyStatus request ({"study_id": "<id>"})'
    study_id = _field(_object(data, what), 'study_id', str, what)
    if not study_id:
      raise PayloadError(f'{what} field study_id is empty')
    return cls(study_id=study_id)


@dataclasses.dataclass(frozen=True)
class StudyStatusReply:
  """SubmitStudy's and StudyStatus's reply: where a study stands at the silo (no request body).

  Attributes:
    study_id: The study's id (a hash of its content).
    name: Its readable name.
    status: `pending`, `approved` or `rejected`.
    reason: The data owner's reason for a decision, if they gave one.
    rounds_approved: Training rounds approved (0 until approved).
    rounds_used: Training rounds charged.
    rounds_remaining: Training rounds left.
    evaluations_approved: Evaluation calls approved.
    evaluations_used: Evaluation calls charged.
    evaluations_remaining: Evaluation calls left.
    violations: How the study breaks the silo's policy (empty: it fits).
  """

  study_id: str
  name: str
  status: str
  reason: str | None
  rounds_approved: int
  rounds_used: int
  rounds_remaining: int
  evaluations_approved: int
  evaluations_used: int
  evaluations_remaining: int
  violations: tuple[str, ...]

  @classmethod
  def from_study(cls, study: governance_store.Study) -> StudyStatusReply:
    return cls(
      study_id=study.study_id,
      name=study.name,
      status=study.status,
      reason=study.reason,
      rounds_approved=study.rounds_approved,
      rounds_used=study.rounds_used,
      rounds_remaining=study.rounds_remaining,
      evaluations_approved=study.evaluations_approved,
      evaluations_used=study.evaluations_used,
      evaluations_remaining=study.evaluations_remaining,
      violations=tuple(study.violations),
    )

  def approved(self, budget: str) -> int:
    """How many of `budget` (one of `BUDGETS`) the data owner approved."""
    return getattr(self, f'{_budget(budget)}_approved')

  def remaining(self, budget: str) -> int:
    """How many of `budget` (one of `BUDGETS`) are left."""
    return getattr(self, f'{_budget(budget)}_remaining')

  def to_json(self) -> dict[str, Any]:
    return dict(dataclasses.asdict(self), violations=list(self.violations))

  @classmethod
  def from_json(cls, data: Any) -> StudyStatusReply:
    """Raises `PayloadError` naming the field if `data` is not a study's status."""
    what = 'the study status'
    data = _object(data, what)
    counts = {
      f'{budget}_{count}': _field(data, f'{budget}_{count}', int, what)
      for budget in BUDGETS
      for count in ('approved', 'used', 'remaining')
    }
    violations = _field(data, 'violations', list, what)
    if not all(isinstance(v, str) for v in violations):
      raise PayloadError(f'{what} field violations must be a list of strings')
    status = _field(data, 'status', str, what)
    if status not in (
      governance_store.PENDING,
      governance_store.APPROVED,
      governance_store.REJECTED,
    ):
      raise PayloadError(f'{what} field status is {status!r}, not pending, approved or rejected')
    return cls(
      study_id=_field(data, 'study_id', str, what),
      name=_field(data, 'name', str, what),
      status=status,
      reason=_field(data, 'reason', str, what, optional=True),
      violations=tuple(violations),
      **counts,
    )


def _round_fields(data: Any, what: str) -> tuple[dict[str, Any], str, int, int]:
  data = _object(data, what)
  study_id = _field(data, 'study_id', str, what)
  round_number = _field(data, 'round', int, what)
  attempt = _field(data, 'attempt', int, what)
  if not study_id or round_number < 1 or attempt < 0:
    raise PayloadError(f'{what}: study_id must be set, round >= 1 and attempt >= 0')
  return data, study_id, round_number, attempt


@dataclasses.dataclass(frozen=True)
class SecureRoundRequest:
  """SecureKeys's request: a fresh key for this round of the study, among `roster`."""

  study_id: str
  round: int
  attempt: int
  roster: tuple[str, ...]

  def to_json(self) -> dict[str, Any]:
    return {
      'study_id': self.study_id,
      'round': self.round,
      'attempt': self.attempt,
      'roster': list(self.roster),
    }

  @classmethod
  def from_json(cls, data: Any) -> SecureRoundRequest:
    what = f'the {SECURE_KEYS} request'
    data, study_id, round_number, attempt = _round_fields(data, what)
    roster = _field(data, 'roster', list, what)
    if not all(isinstance(name, str) and name for name in roster):
      raise PayloadError(f'{what} field roster must list silo names')
    return cls(study_id, round_number, attempt, tuple(roster))


@dataclasses.dataclass(frozen=True)
class SecureConfirmRequest:
  """SecureConfirm's request: every roster silo's key bundle, as the coordinator relays them."""

  study_id: str
  round: int
  attempt: int
  bundles: tuple[key_agreement.KeyBundle, ...]

  def to_json(self) -> dict[str, Any]:
    return {
      'study_id': self.study_id,
      'round': self.round,
      'attempt': self.attempt,
      'bundles': [b.to_json() for b in self.bundles],
    }

  @classmethod
  def from_json(cls, data: Any) -> SecureConfirmRequest:
    what = f'the {SECURE_CONFIRM} request'
    data, study_id, round_number, attempt = _round_fields(data, what)
    bundles = _field(data, 'bundles', list, what)
    return cls(
      study_id,
      round_number,
      attempt,
      tuple(key_agreement.KeyBundle.from_json(_object(b, f'{what} bundle')) for b in bundles),
    )


@dataclasses.dataclass(frozen=True)
class SecureConfirmReply:
  """A silo's signature on the digest of the roster it verified."""

  signature: bytes

  def to_json(self) -> dict[str, Any]:
    return {'signature': self.signature.hex()}

  @classmethod
  def from_json(cls, data: Any) -> SecureConfirmReply:
    what = f'the {SECURE_CONFIRM} reply'
    try:
      return cls(bytes.fromhex(_field(_object(data, what), 'signature', str, what)))
    except ValueError as e:
      raise PayloadError(f'{what} field signature is not hex') from e


@dataclasses.dataclass(frozen=True)
class SecureReleaseRequest:
  """SecureRelease's request: every silo's roster confirmation, and which value to release.

  `executor_id` and `value_ref` name the training result this caller made on
  the silo's executor service (its call of the study's training computation).
  """

  study_id: str
  round: int
  attempt: int
  confirmations: dict[str, bytes]
  executor_id: str
  value_ref: str

  def to_json(self) -> dict[str, Any]:
    return {
      'study_id': self.study_id,
      'round': self.round,
      'attempt': self.attempt,
      'confirmations': {k: v.hex() for k, v in self.confirmations.items()},
      'executor_id': self.executor_id,
      'value_ref': self.value_ref,
    }

  @classmethod
  def from_json(cls, data: Any) -> SecureReleaseRequest:
    what = f'the {SECURE_RELEASE} request'
    data, study_id, round_number, attempt = _round_fields(data, what)
    raw = _field(data, 'confirmations', dict, what)
    try:
      confirmations = {str(k): bytes.fromhex(v) for k, v in raw.items()}
    except (TypeError, ValueError) as e:
      raise PayloadError(f'{what} field confirmations must map silo names to hex') from e
    return cls(
      study_id,
      round_number,
      attempt,
      confirmations,
      _field(data, 'executor_id', str, what),
      _field(data, 'value_ref', str, what),
    )


@dataclasses.dataclass(frozen=True)
class SecureReleaseReply:
  """A silo's masked, noised partial aggregate: 64-bit ring elements and their layout."""

  vector: bytes
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[str, ...]

  def to_json(self) -> dict[str, Any]:
    return {
      'vector': base64.b64encode(self.vector).decode('ascii'),
      'shapes': [list(s) for s in self.shapes],
      'dtypes': list(self.dtypes),
    }

  @classmethod
  def from_json(cls, data: Any) -> SecureReleaseReply:
    what = f'the {SECURE_RELEASE} reply'
    data = _object(data, what)
    try:
      vector = base64.b64decode(_field(data, 'vector', str, what), validate=True)
      shapes = tuple(tuple(int(d) for d in s) for s in _field(data, 'shapes', list, what))
      dtypes = tuple(str(d) for d in _field(data, 'dtypes', list, what))
    except (TypeError, ValueError) as e:
      raise PayloadError(f'{what} is malformed: {e}') from e
    if len(vector) % 8 or len(shapes) != len(dtypes):
      raise PayloadError(f'{what} is malformed: vector or layout length')
    return cls(vector, shapes, dtypes)


@dataclasses.dataclass(frozen=True)
class ReleaseStatisticsRequest:
  """ReleaseStatistics's request: the approved study, and the query the caller claims it is."""

  study_id: str
  query: statistics_query.StatisticsQuery

  def to_json(self) -> dict[str, Any]:
    return {'study_id': self.study_id, 'query': self.query.to_json()}

  @classmethod
  def from_json(cls, data: Any) -> ReleaseStatisticsRequest:
    """Raises `PayloadError` or `StatisticsQueryError` naming the malformed field."""
    what = f'the {RELEASE_STATISTICS} request'
    data = _object(data, what)
    study_id = _field(data, 'study_id', str, what)
    if not study_id:
      raise PayloadError(f'{what} field study_id is empty')
    return cls(
      study_id, statistics_query.StatisticsQuery.from_json(_field(data, 'query', dict, what))
    )


@dataclasses.dataclass(frozen=True)
class ReleaseStatisticsReply:
  """A silo's noised statistics (`statistics.mechanism.release`) and what the release cost.

  Attributes:
    silo: The silo's name.
    study_id: The statistics study.
    release_number: Which of the study's approved releases this is.
    epsilon: The study's ε so far at the silo's δ (None in a noise-free test mode).
    delta: The silo's policy δ.
    release: The noised values, their noise standard deviations and the
      categorical thresholds.
  """

  silo: str
  study_id: str
  release_number: int
  epsilon: float | None
  delta: float
  release: dict[str, Any]

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: Any) -> ReleaseStatisticsReply:
    """Raises `PayloadError` naming the field if `data` is not a statistics release."""
    what = f'the {RELEASE_STATISTICS} reply'
    data = _object(data, what)
    epsilon = _field(data, 'epsilon', object, what)
    delta = _field(data, 'delta', object, what)
    if (epsilon is not None and not isinstance(epsilon, (int, float))) or not isinstance(
      delta, (int, float)
    ):
      raise PayloadError(f'{what} fields epsilon and delta must be numbers')
    release = _field(data, 'release', dict, what)
    for key, kind in (('rows', (int, float)), ('numeric', dict), ('categorical', dict)):
      if not isinstance(release.get(key), kind):
        raise PayloadError(f'{what} field release.{key} is missing or malformed')
    return cls(
      silo=_field(data, 'silo', str, what),
      study_id=_field(data, 'study_id', str, what),
      release_number=_field(data, 'release_number', int, what),
      epsilon=None if epsilon is None else float(epsilon),
      delta=float(delta),
      release=release,
    )


def _budget(budget: str) -> str:
  if budget not in BUDGETS:
    raise ValueError(f'budget must be one of {BUDGETS}, got {budget!r}')
  return budget


# The one place domain errors become gRPC statuses; the first class that matches decides.
_STATUS_CODES: tuple[tuple[type[FedpipeError], grpc.StatusCode], ...] = (
  (PayloadError, grpc.StatusCode.INVALID_ARGUMENT),
  (study_request.StudyRequestError, grpc.StatusCode.INVALID_ARGUMENT),
  (statistics_query.StatisticsQueryError, grpc.StatusCode.INVALID_ARGUMENT),
  (governance_gate.StatisticsUnavailableError, grpc.StatusCode.FAILED_PRECONDITION),
  (governance_store.UnknownStudyError, grpc.StatusCode.NOT_FOUND),
  (silo_policy.PolicyRefusalError, grpc.StatusCode.PERMISSION_DENIED),
  (key_agreement.SecureAggregationError, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_code(error: FedpipeError) -> grpc.StatusCode:
  """The gRPC status a silo answers `error` with (the table in the module docstring)."""
  for error_type, code in _STATUS_CODES:
    if isinstance(error, error_type):
      return code
  return grpc.StatusCode.INTERNAL


def abort(context: grpc.ServicerContext, error: FedpipeError, *, silo: str) -> NoReturn:
  """Ends the call with `error`'s status (`status_code`) and its message, naming the silo."""
  context.abort(status_code(error), f'silo {silo}: {error}')
  raise AssertionError('grpc.ServicerContext.abort returned')  # It raises.
