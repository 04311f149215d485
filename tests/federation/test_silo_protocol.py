"""Tests of fedpipe.federation.silo_protocol: names, payloads and the error-to-status mapping.

The protocol spoken over a real silo is tested in tests/governance/test_governance.py
(malformed payloads from a raw gRPC client) and tests/federation/test_tls_front.py.
"""

import json

import grpc
import pytest

from fedpipe.data import manifest as manifest_lib
from fedpipe.errors import FedpipeError
from fedpipe.federation import silo_protocol
from fedpipe.governance import policy as silo_policy
from fedpipe.governance import store as governance_store
from fedpipe.governance import study_request
from fedpipe.runtime import executor_service


def _manifest():
  return manifest_lib.Manifest(
    feature_spec={'label': {'name': 'y', 'num_classes': 3}},
    splits={'train': manifest_lib.SplitManifest({'a': 2, 'b': 3})},
    num_features=4,
    num_classes=3,
    extra={'preprocessing': {'rows_read': {'train': 5}, 'ignored_columns': {'train': {'ssn': 5}}}},
  )


def _study(**changes):
  fields = dict(
    study_id='0123456789abcdef',
    caller='coordinator',
    name='digits',
    status=governance_store.APPROVED,
    submitted_at=1.0,
    decided_at=2.0,
    reason=None,
    request={'privacy': {}},
    review={'violations': ['too many rounds']},
    rounds_approved=8,
    rounds_used=3,
    evaluations_approved=2,
    evaluations_used=2,
  )
  return governance_store.Study(**dict(fields, **changes))


def test_the_silo_serves_tffs_executor_service_and_its_own():
  assert silo_protocol.method_path(silo_protocol.GET_MANIFEST) == '/fedpipe.Silo/GetManifest'
  assert silo_protocol.SILO_METHODS == (
    'GetManifest',
    'SubmitStudy',
    'StudyStatus',
    'SecureKeys',
    'SecureConfirm',
    'SecureRelease',
    'SubmitStatisticsStudy',
    'ReleaseStatistics',
  )
  assert set(silo_protocol.STUDY_METHODS) < set(silo_protocol.SILO_METHODS)
  assert silo_protocol.EXECUTOR_SERVICE == executor_service.SERVICE
  assert silo_protocol.EXECUTOR_METHODS == executor_service.METHODS
  assert silo_protocol.HEALTH_SERVICES == ('', executor_service.SERVICE, 'fedpipe.Silo')


def test_manifest_reply_keeps_ignored_column_names_at_the_silo():
  manifest = _manifest()
  wire = silo_protocol.encode(silo_protocol.ManifestReply(silo='silo-a', manifest=manifest))
  assert b'ssn' not in wire and b'ignored_columns' not in wire
  # The silo's own manifest is not changed by serving it.
  assert manifest.extra['preprocessing']['ignored_columns'] == {'train': {'ssn': 5}}
  reply = silo_protocol.decode(silo_protocol.ManifestReply, wire, what='the reply')
  assert reply.silo == 'silo-a'
  assert dict(reply.manifest.split('train').clients) == {'a': 2, 'b': 3}
  assert reply.manifest.extra['preprocessing'] == {'rows_read': {'train': 5}}


@pytest.mark.parametrize(
  'data,expected',
  [
    ([], 'the GetManifest reply must be a JSON object, got a list'),
    ({'manifest': {}}, 'the GetManifest reply has no field silo'),
    ({'silo': 'a', 'manifest': []}, 'field manifest must be an object, got a list'),
    ({'silo': 'a', 'manifest': {'schema_version': 1}}, 'malformed manifest'),
  ],
)
def test_a_malformed_manifest_reply_is_a_payload_error(data, expected):
  with pytest.raises(silo_protocol.PayloadError) as e:
    silo_protocol.ManifestReply.from_json(data)
  assert expected in str(e.value)


@pytest.mark.parametrize(
  'payload,expected',
  [
    (b'{}', 'has no field study_id'),
    (b'{"study_id": null}', 'field study_id must be a string, got null'),
    (b'{"study_id": 12}', 'field study_id must be a string, got a whole number'),
    (b'{"study_id": ""}', 'field study_id is empty'),
    (b'"0123"', 'must be a JSON object, got a string'),
    (b'{"study_id": ', 'is not JSON'),
    (b'\xff', 'is not JSON'),
    (b'[' * 100_000, 'is not JSON'),
  ],
)
def test_a_malformed_status_request_names_its_field(payload, expected):
  with pytest.raises(silo_protocol.PayloadError) as e:
    silo_protocol.decode(silo_protocol.StudyStatusRequest, payload, what='the StudyStatus request')
  assert expected in str(e.value)
  assert silo_protocol.status_code(e.value) == grpc.StatusCode.INVALID_ARGUMENT


def test_status_request_round_trips():
  wire = silo_protocol.encode(silo_protocol.StudyStatusRequest('0123456789abcdef'))
  assert json.loads(wire) == {'study_id': '0123456789abcdef'}
  decoded = silo_protocol.decode(silo_protocol.StudyStatusRequest, wire, what='request')
  assert decoded.study_id == '0123456789abcdef'


def test_status_reply_says_where_a_study_stands_and_round_trips():
  reply = silo_protocol.StudyStatusReply.from_study(_study())
  assert reply.to_json() == {
    'study_id': '0123456789abcdef',
    'name': 'digits',
    'status': 'approved',
    'reason': None,
    'rounds_approved': 8,
    'rounds_used': 3,
    'rounds_remaining': 5,
    'evaluations_approved': 2,
    'evaluations_used': 2,
    'evaluations_remaining': 0,
    'violations': ['too many rounds'],
  }
  assert 'request' not in reply.to_json() and 'caller' not in reply.to_json()
  wire = silo_protocol.encode(reply)
  assert silo_protocol.decode(silo_protocol.StudyStatusReply, wire, what='reply') == reply
  assert (reply.remaining('rounds'), reply.approved('evaluations')) == (5, 2)
  with pytest.raises(ValueError, match='budget must be one of'):
    reply.remaining('epsilon')


@pytest.mark.parametrize(
  'change,expected',
  [
    ({'status': 'maybe'}, "field status is 'maybe'"),
    ({'rounds_used': '3'}, 'field rounds_used must be a whole number, got a string'),
    ({'violations': [1]}, 'field violations must be a list of strings'),
    ({'reason': 3}, 'field reason must be a string, got a whole number'),
  ],
)
def test_a_malformed_status_reply_names_its_field(change, expected):
  data = dict(silo_protocol.StudyStatusReply.from_study(_study()).to_json(), **change)
  with pytest.raises(silo_protocol.PayloadError) as e:
    silo_protocol.StudyStatusReply.from_json(data)
  assert expected in str(e.value)


def test_a_status_reply_without_a_field_names_it():
  data = silo_protocol.StudyStatusReply.from_study(_study()).to_json()
  del data['name']
  with pytest.raises(silo_protocol.PayloadError, match='the study status has no field name'):
    silo_protocol.StudyStatusReply.from_json(data)


def test_a_study_request_that_is_not_one_is_an_invalid_argument_naming_the_field():
  with pytest.raises(study_request.StudyRequestError) as e:
    silo_protocol.decode(study_request.StudyRequest, b'{"format": "fedpipe-study/2"}', what='x')
  assert 'the study request has no field computations' in str(e.value)
  assert silo_protocol.status_code(e.value) == grpc.StatusCode.INVALID_ARGUMENT


class _Unmapped(FedpipeError):
  pass


@pytest.mark.parametrize(
  'error,code',
  [
    (silo_protocol.PayloadError('x'), grpc.StatusCode.INVALID_ARGUMENT),
    (study_request.StudyRequestError('x'), grpc.StatusCode.INVALID_ARGUMENT),
    (governance_store.UnknownStudyError('x'), grpc.StatusCode.NOT_FOUND),
    (silo_policy.PolicyRefusalError('x'), grpc.StatusCode.PERMISSION_DENIED),
    (governance_store.GovernanceError('x'), grpc.StatusCode.INTERNAL),
    (_Unmapped('x'), grpc.StatusCode.INTERNAL),
  ],
)
def test_each_domain_error_has_one_status(error, code):
  assert silo_protocol.status_code(error) == code


def test_abort_names_the_silo_and_uses_the_errors_status():
  class Context:
    def abort(self, code, details):
      self.code, self.details = code, details
      raise RuntimeError('aborted')

  context = Context()
  with pytest.raises(RuntimeError, match='aborted'):
    silo_protocol.abort(context, governance_store.UnknownStudyError('no study 01'), silo='a')
  assert (context.code, context.details) == (grpc.StatusCode.NOT_FOUND, 'silo a: no study 01')
