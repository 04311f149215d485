"""TFF execution contexts over fedpipe-owned workers.

TFF's `set_sync_local_cpp_execution_context` starts its own worker on a host
port that every network can reach. These builders take the gRPC target of a
worker fedpipe started itself (`IsolatedWorker.target`, a `unix://` socket)
and compile computations exactly as TFF's native backend does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
import tensorflow_federated as tff

from fedpipe.errors import FedpipeError
from fedpipe.runtime import executor_service, isolated_worker

_MAX_MESSAGE_BYTES = 2 * 1000 * 1000 * 1000
CHANNEL_OPTIONS = (
  ('grpc.max_message_length', _MAX_MESSAGE_BYTES),
  ('grpc.max_receive_message_length', _MAX_MESSAGE_BYTES),
  ('grpc.max_send_message_length', _MAX_MESSAGE_BYTES),
)


class NoRuntimeError(FedpipeError, RuntimeError):
  """A TFF computation was invoked outside any fedpipe runtime."""


class _RefusingContext(tff.framework.SyncContext):
  """Stands in for TFF's import-time default, which starts an exposed worker."""

  def invoke(self, comp, arg):
    del comp, arg
    raise NoRuntimeError(
      "no fedpipe runtime is active. TFF's own default context would start "
      'an unauthenticated worker on a host port; run computations inside '
      '`fedpipe.runtime.execution_context.local_worker_context(...)` instead.'
    )


def refuse_unisolated_default_context() -> None:
  """Replaces TFF's default context (set when `tensorflow_federated` is
  imported: a worker on a host port, reachable from any network) with one
  that refuses to run anything."""
  tff.framework.set_default_context(_RefusingContext())


class WorkerCallError(grpc.RpcError):
  """A call to a TFF worker failed, not to be retried; `code()` and `details()` as gRPC's."""

  def __init__(self, code: grpc.StatusCode, details: str):
    super().__init__(f'{code.name}: {details}')
    self._code = code
    self._details = details

  def code(self) -> grpc.StatusCode:
    return self._code

  def details(self) -> str:
    return self._details


class FailFastStub(tff.framework.RemoteExecutorGrpcStub):
  """TFF's stub, minus endless retries.

  TFF marks UNAVAILABLE and similar statuses retryable, and its execution
  contexts then retry forever: a dead worker or silo would hang the run. Here
  every failed call raises `WorkerCallError`, and the program decides
  (fail the round naming the silo, or drop the silo).
  """


def _fail_fast(name: str):
  method = getattr(tff.framework.RemoteExecutorGrpcStub, name)

  def call(self, request):
    try:
      return method(self, request)
    except grpc.RpcError as e:  # RetryableGRPCError is one too.
      raise WorkerCallError(e.code(), e.details() or '') from None

  call.__name__ = name
  return call


for _method in executor_service.METHODS:
  _name = executor_service.stub_method_name(_method)
  setattr(FailFastStub, _name, _fail_fast(_name))


def executor_factory_for_channel(
  channel: grpc.Channel, *, default_num_clients: int = 0
) -> tff.framework.ExecutorFactory:
  """An executor factory whose executors run on the worker behind `channel`."""
  stub = FailFastStub(channel)

  def stack_fn(cardinalities):
    # Computations with no CLIENTS-placed argument still need a cardinality.
    cardinalities.setdefault(tff.CLIENTS, default_num_clients)
    executor = tff.framework.RemoteExecutor(stub)
    executor.set_cardinalities(cardinalities)
    return executor

  return tff.framework.ResourceManagingExecutorFactory(executor_stack_fn=stack_fn)


def wire_computation(comp: tff.Computation):
  """The `Computation` proto a worker receives when these contexts run `comp`.

  Governed silos approve computations by the fingerprint of this proto.
  """
  return tff.backends.native.desugar_and_transform_to_native(comp).to_building_block().proto


def create_sync_context(channel: grpc.Channel) -> tff.framework.SyncExecutionContext:
  """A synchronous TFF context that runs everything on one worker."""
  return tff.framework.SyncExecutionContext(
    executor_fn=executor_factory_for_channel(channel),
    compiler_fn=tff.backends.native.desugar_and_transform_to_native,
    transform_args=tff.tensorflow.transform_args,
    transform_result=tff.tensorflow.transform_result,
  )


def create_async_context(channel: grpc.Channel) -> tff.framework.AsyncExecutionContext:
  """An asynchronous TFF context that runs everything on one worker."""
  return tff.framework.AsyncExecutionContext(
    executor_fn=executor_factory_for_channel(channel),
    compiler_fn=tff.backends.native.desugar_and_transform_to_native,
    transform_args=tff.tensorflow.transform_args,
    transform_result=tff.tensorflow.transform_result,
  )


@contextlib.contextmanager
def local_worker_context(
  working_dir: str,
  *,
  log_path: str | None = None,
  allow_exposed_worker: bool = False,
  max_concurrent_computation_calls: int = isolated_worker.NO_LIMIT,
  allow_unconfined_worker: bool = False,
) -> Iterator[isolated_worker.IsolatedWorker]:
  """Starts an isolated worker and makes it TFF's default context for the block.

  Args:
    working_dir: The worker's working directory (client data is read relative
      to it).
    log_path: File for the worker's output.
    allow_exposed_worker: See `IsolatedWorker`.
    max_concurrent_computation_calls: See `IsolatedWorker`.
    allow_unconfined_worker: `IsolatedWorker`'s `allow_unconfined_filesystem`.

  Yields:
    The running worker. It is stopped, and the previous default context
    restored, when the block exits by any path.

  Raises:
    isolated_worker.WorkerIsolationError: See `IsolatedWorker.start`.
    isolated_worker.WorkerStartError: See `IsolatedWorker.start`.
  """
  refuse_unisolated_default_context()
  with isolated_worker.IsolatedWorker(
    working_dir=working_dir,
    log_path=log_path,
    allow_exposed=allow_exposed_worker,
    max_concurrent_computation_calls=max_concurrent_computation_calls,
    allow_unconfined_filesystem=allow_unconfined_worker,
  ) as worker:
    channel = grpc.insecure_channel(worker.target, options=CHANNEL_OPTIONS)
    try:
      with tff.framework.get_context_stack().install(create_sync_context(channel)):
        yield worker
    finally:
      channel.close()
