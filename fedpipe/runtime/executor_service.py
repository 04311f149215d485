"""TFF's executor service: the gRPC service a TFF worker serves, its name and its methods.

A worker (`isolated_worker`) serves `tensorflow_federated.v0.ExecutorGroup`
(tensorflow_federated/proto/v0/executor.proto); the contexts in
`execution_context` call it, a silo relays it to its worker and the
governance gate judges each of its calls by method. They all name the
service and its methods with these constants, which
tests/runtime/test_executor_service.py checks against TFF's descriptor.
"""

from __future__ import annotations

import re

SERVICE = 'tensorflow_federated.v0.ExecutorGroup'

GET_EXECUTOR = 'GetExecutor'
CREATE_VALUE = 'CreateValue'
CREATE_CALL = 'CreateCall'
CREATE_STRUCT = 'CreateStruct'
CREATE_SELECTION = 'CreateSelection'
COMPUTE = 'Compute'
DISPOSE = 'Dispose'
DISPOSE_EXECUTOR = 'DisposeExecutor'

METHODS = (
  GET_EXECUTOR,
  CREATE_VALUE,
  CREATE_CALL,
  CREATE_STRUCT,
  CREATE_SELECTION,
  COMPUTE,
  DISPOSE,
  DISPOSE_EXECUTOR,
)
"""Every method of the service, in the order executor.proto declares them."""

EXECUTOR_LIFECYCLE_METHODS = (GET_EXECUTOR, DISPOSE_EXECUTOR)
"""The methods that make or end an executor, rather than act on its values."""

VALUE_CREATING_METHODS = (CREATE_VALUE, CREATE_CALL, CREATE_STRUCT, CREATE_SELECTION)
"""The methods whose response names a new value on the executor (`value_ref`)."""

_WORD_START = re.compile(r'(?<!^)(?=[A-Z])')


def stub_method_name(method: str) -> str:
  """The name of `method` on TFF's Python stub (`RemoteExecutorGrpcStub`): `CreateValue` -> `create_value`."""
  return _WORD_START.sub('_', method).lower()
