"""Tests of fedpipe.runtime.rpc_errors: one line for a failed gRPC call, however it is wrapped."""

import grpc

from fedpipe.runtime import rpc_errors
from fedpipe.runtime.execution_context import WorkerCallError

_TFF_DETAILS = (
  'Assertion failed: [invalid client id:] [../etc]\n\t [[{{node Assert}}]]'
  ' while evaluating local [computation dump]\nmore graph context'
)


def _wrapped(error):
  """`error` as TFF hands it up: the cause of an error in another's context."""
  middle = RuntimeError('TFF failed')
  middle.__cause__ = error
  outer = ValueError('while invoking')
  outer.__context__ = middle
  return outer


def test_rpc_summary_is_the_code_and_the_first_line_without_tffs_context():
  error = WorkerCallError(grpc.StatusCode.INVALID_ARGUMENT, _TFF_DETAILS)
  assert rpc_errors.rpc_summary(error) == (
    'INVALID_ARGUMENT: Assertion failed: [invalid client id:] [../etc]'
  )
  assert rpc_errors.rpc_summary(error, limit=9) == 'INVALID_ARGUMENT: Assertion'
  long = WorkerCallError(grpc.StatusCode.INTERNAL, 'x' * 1000)
  assert rpc_errors.rpc_summary(long) == 'INTERNAL: ' + 'x' * rpc_errors.DEFAULT_LIMIT
  assert rpc_errors.rpc_summary(long, limit=None) == 'INTERNAL: ' + 'x' * 1000


def test_the_rpc_error_is_found_anywhere_in_the_chain():
  error = WorkerCallError(grpc.StatusCode.UNAVAILABLE, 'socket closed')
  wrapped = _wrapped(error)
  assert rpc_errors.find_rpc_error(wrapped) is error
  assert rpc_errors.error_summary(wrapped) == 'UNAVAILABLE: socket closed'


def test_without_an_rpc_error_the_error_itself_is_summarized():
  error = ValueError('bad value\nsecond line')
  assert rpc_errors.find_rpc_error(error) is None
  assert rpc_errors.error_summary(error) == 'ValueError: bad value'
  assert rpc_errors.exception_summary(KeyError('k'), limit=2) == "KeyError: 'k"
  assert rpc_errors.exception_summary(RuntimeError()) == 'RuntimeError: '


def test_a_cyclic_chain_ends():
  a, b = RuntimeError('a'), RuntimeError('b')
  a.__context__, b.__context__ = b, a
  assert list(rpc_errors.error_chain(a)) == [a, b]
