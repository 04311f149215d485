"""The coordinator's side of a secure-aggregation round: relay keys, sum masked vectors.

For each silo the coordinator sets up the call of the training computation
on the silo's executor service (as for any round) but never computes it:
the silos compute, encode, noise and mask it themselves (`secure_rounds`).
The coordinator relays the signed key bundles and the roster confirmations,
adds the masked vectors modulo 2^64 and decodes the sum. It learns the sum
of the silos' noised partial aggregates and nothing about any one of them.

A silo that fails after the keys of an attempt are fixed makes the attempt
useless (its masks can never be removed); with `on_failure='drop'` the round
is run again among the others with fresh keys and fresh noise (the next
attempt), else the run stops naming the silo.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import computation_pb2, executor_pb2, executor_pb2_grpc

from fedpipe.errors import FedpipeError
from fedpipe.federation import key_agreement, secure_sum, silo_protocol
from fedpipe.governance import secure_terms
from fedpipe.runtime import execution_context


class SecureRoundError(FedpipeError, RuntimeError):
  """A secure round cannot complete; `silo` names the silo at fault."""

  def __init__(self, silo: str, message: str):
    super().__init__(message)
    self.silo = silo


@dataclasses.dataclass(frozen=True)
class SecureStudy:
  """The approved study whose rounds are aggregated securely."""

  study_id: str
  terms: secure_terms.SecureAggregationTerms


@dataclasses.dataclass(frozen=True)
class _Prepared:
  executor_id: str
  value_ref: str


def serialize_function(comp) -> executor_pb2.Value:
  """`comp` as `prepare_call` sends it (compiling it takes most of a second: do it once)."""
  function, _ = tff.framework.serialize_value(execution_context.wire_computation(comp))
  return function


def prepare_call(
  channel, comp, arg, *, timeout_s: float, function: executor_pb2.Value | None = None
) -> _Prepared:
  """Sends `comp` and `arg` to a silo's executor service and makes the call, without computing it.

  Args:
    channel: The silo's channel.
    comp: The computation (the round's silo half).
    arg: Its argument.
    timeout_s: Per-RPC timeout.
    function: `serialize_function(comp)`, if already made.
  """
  stub = executor_pb2_grpc.ExecutorGroupStub(channel)
  param_type = comp.type_signature.parameter
  clients = _count_clients(arg, param_type)
  executor = stub.GetExecutor(
    executor_pb2.GetExecutorRequest(
      cardinalities=[
        executor_pb2.Cardinality(
          placement=computation_pb2.Placement(uri=tff.CLIENTS.uri), cardinality=clients
        )
      ]
    ),
    timeout=timeout_s,
  ).executor
  if function is None:
    function = serialize_function(comp)
  argument, _ = tff.framework.serialize_value(arg, param_type)
  function_ref = stub.CreateValue(
    executor_pb2.CreateValueRequest(executor=executor, value=function), timeout=timeout_s
  ).value_ref
  argument_ref = stub.CreateValue(
    executor_pb2.CreateValueRequest(executor=executor, value=argument), timeout=timeout_s
  ).value_ref
  call = stub.CreateCall(
    executor_pb2.CreateCallRequest(
      executor=executor, function_ref=function_ref, argument_ref=argument_ref
    ),
    timeout=timeout_s,
  ).value_ref
  return _Prepared(executor.id, call.id)


def dispose(channel, executor_id: str, *, timeout_s: float) -> None:
  stub = executor_pb2_grpc.ExecutorGroupStub(channel)
  stub.DisposeExecutor(
    executor_pb2.DisposeExecutorRequest(executor=executor_pb2.ExecutorId(id=executor_id)),
    timeout=timeout_s,
  )


def _count_clients(value: Any, type_spec: tff.Type) -> int:
  if isinstance(type_spec, tff.StructType):
    elements = tff.structure.iter_elements(tff.structure.from_container(value))
    return max(
      [
        _count_clients(v, t)
        for (_, v), (_, t) in zip(elements, tff.structure.iter_elements(type_spec))
      ]
      or [1]
    )
  if isinstance(type_spec, tff.FederatedType) and type_spec.placement is tff.CLIENTS:
    return len(value)
  return 1


def pack(leaves: Sequence[np.ndarray], type_spec: tff.Type) -> Any:
  """Rebuilds a value of `type_spec` (a struct of tensors) from its leaves in order."""
  remaining = list(leaves)

  def build(t):
    if isinstance(t, tff.StructType):
      return tff.structure.Struct(
        [(name, build(element)) for name, element in tff.structure.iter_elements(t)]
      )
    return remaining.pop(0)

  value = build(type_spec.member if isinstance(type_spec, tff.FederatedType) else type_spec)
  if remaining:
    raise secure_sum.SecureSumError(f'{len(remaining)} decoded tensors left over')
  return value


Call = Callable[[str, Callable[[], Any]], Awaitable[Any]]
"""Runs a blocking call on silo `name`'s connection; raises SecureRoundError naming it."""


async def run_attempt(
  *,
  study: SecureStudy,
  round_number: int,
  attempt: int,
  silos: dict[str, Any],
  prepared: dict[str, _Prepared],
  timeout_s: float,
  call: Call,
) -> tuple[list[np.ndarray], secure_sum.TensorLayout, dict[str, bytes]]:
  """One attempt of a round among `silos` (connections whose calls were `prepared`).

  Returns:
    (the decoded sum's tensors, their layout, each silo's released bytes).

  Raises:
    SecureRoundError: Naming the first silo that refused or failed.
  """
  roster = tuple(sorted(silos))

  def ask(name, method, request, reply_type):
    def send():
      data = silos[name].call_silo(method, silo_protocol.encode(request), timeout_s)
      return silo_protocol.decode(reply_type, data, what=f'the {method} reply of silo {name}')

    return call(name, send)

  keys_request = silo_protocol.SecureRoundRequest(study.study_id, round_number, attempt, roster)
  bundles = await asyncio.gather(
    *(ask(n, silo_protocol.SECURE_KEYS, keys_request, _BundleReply) for n in roster)
  )
  confirm_request = silo_protocol.SecureConfirmRequest(
    study.study_id, round_number, attempt, tuple(b.bundle for b in bundles)
  )
  signatures = await asyncio.gather(
    *(
      ask(n, silo_protocol.SECURE_CONFIRM, confirm_request, silo_protocol.SecureConfirmReply)
      for n in roster
    )
  )
  confirmations = {n: s.signature for n, s in zip(roster, signatures)}
  replies = await asyncio.gather(
    *(
      ask(
        n,
        silo_protocol.SECURE_RELEASE,
        silo_protocol.SecureReleaseRequest(
          study.study_id,
          round_number,
          attempt,
          confirmations,
          prepared[n].executor_id,
          prepared[n].value_ref,
        ),
        silo_protocol.SecureReleaseReply,
      )
      for n in roster
    )
  )
  layouts = {secure_sum.TensorLayout(r.shapes, r.dtypes) for r in replies}
  if len(layouts) != 1:
    raise SecureRoundError(roster[0], 'the silos released partial aggregates of different shapes')
  (layout,) = layouts
  vectors = [np.frombuffer(r.vector, dtype='<u8').astype(np.uint64) for r in replies]
  for name, vector in zip(roster, vectors):
    if vector.shape != (layout.size,):
      raise SecureRoundError(name, f'silo {name} released {vector.size} values, not {layout.size}')
  total = secure_sum.modular_sum(vectors)
  decoded = secure_sum.decode_sum(total, layout, study.terms.scale)
  return decoded, layout, {n: r.vector for n, r in zip(roster, replies)}


@dataclasses.dataclass(frozen=True)
class _BundleReply:
  bundle: key_agreement.KeyBundle

  @classmethod
  def from_json(cls, data: Any) -> _BundleReply:
    return cls(key_agreement.KeyBundle.from_json(data))
