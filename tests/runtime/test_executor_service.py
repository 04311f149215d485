"""Tests of fedpipe.runtime.executor_service: the names are TFF's own."""

from tensorflow_federated.proto.v0 import executor_pb2

from fedpipe.runtime import execution_context, executor_service


def test_names_are_those_of_tffs_executor_proto():
  service = executor_pb2.DESCRIPTOR.services_by_name['ExecutorGroup']
  assert executor_service.SERVICE == service.full_name
  assert executor_service.METHODS == tuple(m.name for m in service.methods)
  assert set(executor_service.EXECUTOR_LIFECYCLE_METHODS) < set(executor_service.METHODS)
  assert set(executor_service.VALUE_CREATING_METHODS) < set(executor_service.METHODS)
  for method in executor_service.VALUE_CREATING_METHODS:  # Their responses name a new value.
    response = service.methods_by_name[method].output_type
    assert 'value_ref' in response.fields_by_name, method


def test_every_method_of_tffs_stub_fails_fast():
  import tensorflow_federated as tff

  names = [executor_service.stub_method_name(m) for m in executor_service.METHODS]
  assert names[:2] == ['get_executor', 'create_value'] and names[-1] == 'dispose_executor'
  for name in names:
    assert hasattr(tff.framework.RemoteExecutorGrpcStub, name), name
    assert name in vars(execution_context.FailFastStub), name
