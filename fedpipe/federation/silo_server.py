"""A data owner's silo: TFF's executor service over mutual TLS, relayed to an isolated worker.

The server a data owner runs on their own infrastructure:

* speaks TFF's `ExecutorGroup` gRPC service to the coordinator over mutual
  TLS: callers without a client certificate signed by the silo's CA never get
  past the handshake;
* relays every call to a TFF worker it starts and supervises itself, in a
  private loopback-only network namespace, with the silo's client-data
  directory as the worker's working directory (data is read here, by client
  id, and only aggregates leave);
* publishes its manifest (client ids, example counts, feature spec) through
  `fedpipe.Silo/GetManifest`, never record contents (the services, methods
  and payloads are those of `silo_protocol`);
* answers standard gRPC health checks (`grpc.health.v1.Health`);
* logs one JSON object per event;
* restarts its worker if it dies, and ends it on shutdown;
* with a governance gate, also takes study requests (`fedpipe.Silo/SubmitStudy`,
  `StudyStatus`) and runs only approved computations (see governance_gate),
  and statistics studies (`SubmitStatisticsStudy`, `ReleaseStatistics`) on
  the raw data its owner gave it;
* without a data directory runs in *statistics-only* mode: no worker, no
  manifest, only statistics studies (executor calls and GetManifest are
  answered FAILED_PRECONDITION);
* answers every refused request with the status `silo_protocol.status_code`
  gives its error.

Every executor call passes through `ExecutorProxy`, where a `CallGate` (the
data owner's policy, see governance) may refuse it before it reaches the
worker.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow_federated.proto.v0 import executor_pb2, executor_pb2_grpc

from fedpipe.data import manifest as manifest_lib
from fedpipe.errors import FedpipeError
from fedpipe.federation import key_agreement, secure_rounds, silo_protocol, tls_front
from fedpipe.federation import tls as tls_lib
from fedpipe.governance import policy as silo_policy
from fedpipe.governance import store as governance_store
from fedpipe.governance import study_request
from fedpipe.runtime import executor_service, isolated_worker
from fedpipe.statistics import query as statistics_query

LOG = logging.getLogger('fedpipe.silo')

_MAX_MESSAGE_BYTES = 2 * 1000 * 1000 * 1000
GRPC_OPTIONS = (
  ('grpc.max_send_message_length', _MAX_MESSAGE_BYTES),
  ('grpc.max_receive_message_length', _MAX_MESSAGE_BYTES),
  # Coordinators send keepalive pings every 30 s (cross_silo).
  ('grpc.http2.min_recv_ping_interval_without_data_ms', 20_000),
  ('grpc.keepalive_permit_without_calls', 1),
)
_WATCH_INTERVAL_S = 1.0


class SiloStartError(FedpipeError, RuntimeError):
  """The silo server cannot start; the message says what to fix."""


class CallGate(Protocol):
  """Decides whether an executor call may reach the worker.

  Returns None to allow it, or a message to refuse it with (a
  `silo_policy.PolicyRefusalError`: PERMISSION_DENIED). `on_forwarded` runs
  after the worker answered and before the answer is sent, `on_failed` after
  the worker failed and before its error is sent: each returns None to send
  it, or a message to withhold it (PERMISSION_DENIED).
  """

  def check(self, method: str, request, caller: str) -> str | None: ...

  def on_forwarded(self, method: str, request, response, caller: str) -> str | None: ...

  def on_failed(self, method: str, request, caller: str) -> str | None: ...


class StudyGate(CallGate, Protocol):
  """A governed silo's gate: a policy, and the study requests of `fedpipe.Silo`.

  Each method raises a `FedpipeError` that `silo_protocol.status_code`
  names (a policy refusal, an unknown study) to refuse the request.
  """

  policy: silo_policy.SiloPolicy

  def submit_study(
    self, request: study_request.StudyRequest, caller: str
  ) -> governance_store.Study: ...

  def study_status(self, study_id: str, caller: str) -> governance_store.Study: ...

  def submit_statistics_study(
    self, query: statistics_query.StatisticsQuery, caller: str
  ) -> governance_store.Study: ...

  def release_statistics(
    self, study_id: str, sent: statistics_query.StatisticsQuery, caller: str
  ) -> dict[str, Any]: ...


class _WorkerLink:
  """The supervised worker and a stub to it; replaced when the worker dies."""

  def __init__(
    self,
    data_dir: str | None,
    log_path: str | None,
    max_concurrent: int,
    allow_unconfined: bool = False,
  ):
    self._data_dir = data_dir
    self.statistics_only = data_dir is None
    self._log_path = log_path
    self._max_concurrent = max_concurrent
    self._allow_unconfined = allow_unconfined
    self._lock = threading.Lock()
    self.worker: isolated_worker.IsolatedWorker | None = None
    self.channel: grpc.Channel | None = None
    self.stub: executor_pb2_grpc.ExecutorGroupStub | None = None
    self.restarts = 0

  def start(self) -> None:
    if self.statistics_only:
      return
    with self._lock:
      worker = isolated_worker.IsolatedWorker(
        working_dir=self._data_dir,
        log_path=self._log_path,
        max_concurrent_computation_calls=self._max_concurrent,
        allow_unconfined_filesystem=self._allow_unconfined,
      )
      worker.start()
      self.worker = worker
      self.channel = grpc.insecure_channel(worker.target, options=GRPC_OPTIONS)
      self.stub = executor_pb2_grpc.ExecutorGroupStub(self.channel)

  def stop(self) -> None:
    with self._lock:
      if self.channel is not None:
        self.channel.close()
      if self.worker is not None:
        self.worker.stop()
      self.worker = self.channel = self.stub = None

  def alive(self) -> bool:
    return self.statistics_only or (self.worker is not None and self.worker.is_alive())


class _Refused(FedpipeError):
  """Internal: the gate refused a call or withheld its result (`ExecutorProxy._call_worker`)."""

  def __init__(self, event: str, reason: str):
    super().__init__(reason)
    self.event, self.reason = event, reason


class _WorkerDown(FedpipeError):
  """Internal: the worker is restarting."""


class StatisticsOnlyError(FedpipeError, RuntimeError):
  """The silo runs without preprocessed data (statistics only): it serves no computations."""


class _WorkerFailed(FedpipeError):
  """Internal: the worker answered with an error; `withheld` if the gate kept it back."""

  def __init__(self, error: grpc.RpcError, withheld: str | None):
    super().__init__(error.details())
    self.error, self.withheld = error, withheld
    self.summary = redact_worker_error(error.details())


class ExecutorProxy(executor_pb2_grpc.ExecutorGroupServicer):
  """Forwards TFF executor calls to the worker, through the gate, with logs."""

  def __init__(
    self,
    link: _WorkerLink,
    *,
    silo_name: str,
    gate: CallGate | None = None,
    identify: Callable[[grpc.ServicerContext], str] | None = None,
  ):
    self._link = link
    self._silo_name = silo_name
    self._gate = gate
    # The caller's certificate name; ends the call with UNAUTHENTICATED if none.
    self._identify = identify or (
      lambda context: tls_lib.authenticated_caller(context, server=f'silo {silo_name}')
    )

  def _call_worker(self, method: str, request, caller: str):
    """`method(request)` on the worker, through the gate: the response, or why not.

    Raises:
      _Refused: The gate refused the call or withheld its result.
      _WorkerDown: The worker is restarting.
      StatisticsOnlyError: The silo has no worker (statistics-only mode).
      _WorkerFailed: The worker answered with an error (charged first, like a result).
    """
    if self._link.statistics_only:
      policy = getattr(self._gate, 'policy', None)
      refusal = policy.caller_refusal(caller) if policy is not None else None
      if refusal is not None:
        raise _Refused('refused', refusal)
      raise StatisticsOnlyError(
        f'silo {self._silo_name} runs in statistics-only mode (no --data_dir): it serves '
        'statistics studies and no computations; its owner preprocesses the data and restarts '
        'it with --data_dir to train'
      )
    if self._gate is not None:
      refusal = self._gate.check(method, request, caller)
      if refusal is not None:
        raise _Refused('refused', refusal)
    stub = self._link.stub
    if stub is None:
      raise _WorkerDown(f'silo {self._silo_name}: worker is restarting')
    try:
      response = getattr(stub, method)(request)
    except grpc.RpcError as e:
      LOG.error(
        json.dumps(
          {
            'event': 'worker_error',
            'silo': self._silo_name,
            'method': method,
            'caller': caller,
            'code': e.code().name,
            'details': (e.details() or '')[:2000],
          }
        )
      )
      # A computation's failure says something about the data too: it is
      # charged like a result before the caller hears of it.
      withheld = self._gate.on_failed(method, request, caller) if self._gate else None
      raise _WorkerFailed(e, withheld) from None
    if self._gate is not None:
      withheld = self._gate.on_forwarded(method, request, response, caller)
      if withheld is not None:
        raise _Refused('withheld', withheld)
    return response

  def _forward(self, method: str, request, context: grpc.ServicerContext):
    caller = self._identify(context)
    started = time.monotonic()
    try:
      response = self._call_worker(method, request, caller)
    except _Refused as e:
      self._refuse(context, e.event, method, caller, e.reason)
    except _WorkerDown as e:
      context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
    except StatisticsOnlyError as e:
      context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    except _WorkerFailed as e:
      if e.withheld is not None:
        self._refuse(context, 'withheld', method, caller, e.withheld)
      context.abort(e.error.code(), f'silo {self._silo_name}: {e.summary}')
    if method in executor_service.EXECUTOR_LIFECYCLE_METHODS:
      LOG.info(
        json.dumps(
          {
            'event': method,
            'silo': self._silo_name,
            'caller': caller,
            'ms': round(1000 * (time.monotonic() - started), 1),
          }
        )
      )
    return response

  def compute_for(
    self, request: executor_pb2.ComputeRequest, caller: str
  ) -> executor_pb2.ComputeResponse:
    """A Compute call the silo makes itself (a secure release), through the gate.

    Raises:
      silo_policy.PolicyRefusalError: If the gate refuses the call or withholds its result.
      key_agreement.SecureAggregationError: If the worker is down or the computation fails.
    """
    try:
      return self._call_worker(executor_service.COMPUTE, request, caller)
    except _Refused as e:
      raise silo_policy.PolicyRefusalError(e.reason) from None
    except _WorkerDown as e:
      raise key_agreement.SecureAggregationError(str(e), silo=self._silo_name) from None
    except _WorkerFailed as e:
      raise key_agreement.SecureAggregationError(
        e.withheld or f'the round failed on the worker: {e.summary}', silo=self._silo_name
      ) from None

  def _refuse(
    self, context: grpc.ServicerContext, event: str, method: str, caller: str, reason: str
  ) -> NoReturn:
    """Logs a refused call (or withheld result) and ends it as a policy refusal."""
    LOG.warning(
      json.dumps(
        {
          'event': event,
          'silo': self._silo_name,
          'method': method,
          'caller': caller,
          'reason': reason,
        }
      )
    )
    silo_protocol.abort(context, silo_policy.PolicyRefusalError(reason), silo=self._silo_name)


_BRACKETED = re.compile(r'\[[^\[\]]*\]')


def redact_worker_error(details: str | None) -> str:
  """What a caller is told of a worker error: its first line, without tensor values.

  TensorFlow quotes tensor contents in brackets (an `Assert`'s data, a
  failed check's values), and an approved computation could fail on purpose
  to carry client data out in its error. The caller gets the first line with
  every bracketed part cut; the silo's log keeps the whole text.
  """
  line = (details or '').split('\n', 1)[0]
  previous = None
  while previous != line:
    previous, line = line, _BRACKETED.sub('[…]', line)
  return line[:300] + ("; the full error is in the silo's log" if details else '')


def _make_method(name: str) -> Callable:
  def method(self, request, context):
    return self._forward(name, request, context)

  method.__name__ = name
  return method


for _name in silo_protocol.EXECUTOR_METHODS:
  setattr(ExecutorProxy, _name, _make_method(_name))


class _CallerCheckedHealth(health.HealthServicer):
  """gRPC health checks, answered only to callers the silo's policy allows."""

  def __init__(self, admit: Callable[[grpc.ServicerContext], str]):
    """`admit(context)` ends the call unless the caller may use the silo (`SiloServer._admit`)."""
    super().__init__()
    self._admit = admit

  def Check(self, request, context):
    self._admit(context)
    return super().Check(request, context)

  def Watch(self, request, context, send_response_callback=None):
    self._admit(context)
    return super().Watch(request, context, send_response_callback)


class SiloServer:
  """A silo: mTLS executor service, manifest, health; owns its worker."""

  def __init__(
    self,
    *,
    data_dir: str | None,
    listen: str,
    tls: tls_lib.TlsFiles,
    silo_name: str,
    gate: CallGate | None = None,
    worker_log: str | None = None,
    max_concurrent_computation_calls: int = isolated_worker.NO_LIMIT,
    max_workers: int = 16,
    allow_unconfined_worker: bool = False,
  ):
    """Configures the silo; `start()` starts it.

    Args:
      data_dir: The preprocessed client-data directory (manifest.json +
        per-client TFRecords) the silo serves; None for statistics-only mode
        (no worker, no manifest: only statistics studies, which need a gate
        given raw data).
      listen: `host:port` to listen on; port 0 picks a free port.
      tls: This silo's certificate and key, and the CA whose client
        certificates it accepts.
      silo_name: Name reported to coordinators and in logs.
      gate: Optional policy deciding which calls may run.
      worker_log: File for the worker's output.
      max_concurrent_computation_calls: Computations the silo's worker runs at
        once (see `isolated_worker.resolve_concurrent_calls`).
      max_workers: gRPC server threads.
      allow_unconfined_worker: Run the worker with the host's filesystem where
        it cannot be confined to the data (see `worker_sandbox`).
    """
    self._data_dir = data_dir
    self._listen = listen
    self._tls = tls
    self.silo_name = silo_name
    self._gate = gate
    self._max_workers = max_workers
    self._link = _WorkerLink(
      data_dir, worker_log, max_concurrent_computation_calls, allow_unconfined_worker
    )
    self._server: grpc.Server | None = None
    self._health = _CallerCheckedHealth(self._admit)
    self._stop = threading.Event()
    self._watcher: threading.Thread | None = None
    self._manifest_reply = b''
    self._front: tls_front.TlsFront | None = None
    self._internal_port: int | None = None
    self.port: int | None = None

  @property
  def address(self) -> str:
    host = self._listen.rsplit(':', 1)[0]
    return f'{host}:{self.port}'

  def _caller(self, context: grpc.ServicerContext) -> str:
    """The caller's certificate name, as the TLS front verified it.

    A connection the front did not relay (a local process dialling the
    internal port) ends with UNAUTHENTICATED, whatever the method.
    """
    return tls_lib.authenticated_caller(context, self._front, server=f'silo {self.silo_name}')

  def _admit(self, context: grpc.ServicerContext) -> str:
    """The caller, if the silo's policy lets it use this silo at all.

    Ends the call otherwise: UNAUTHENTICATED without a verified certificate,
    PERMISSION_DENIED for a caller the policy does not name.
    """
    caller = self._caller(context)
    policy = getattr(self._gate, 'policy', None)
    refusal = policy.caller_refusal(caller) if policy is not None else None
    if refusal is not None:
      LOG.warning(
        json.dumps(
          {
            'event': 'refused',
            'silo': self.silo_name,
            'caller': caller,
            'peer': context.peer(),
            'reason': 'not in allowed_callers',
          }
        )
      )
      silo_protocol.abort(context, silo_policy.PolicyRefusalError(refusal), silo=self.silo_name)
    return caller

  def _get_manifest(self, request: bytes, context: grpc.ServicerContext) -> bytes:
    del request
    caller = self._admit(context)
    if self._data_dir is None:
      context.abort(
        grpc.StatusCode.FAILED_PRECONDITION,
        f'silo {self.silo_name} runs in statistics-only mode (no --data_dir): it has no '
        'preprocessed client data and no manifest',
      )
    LOG.info(json.dumps({'event': 'GetManifest', 'silo': self.silo_name, 'caller': caller}))
    return self._manifest_reply

  def _submit_study(self, payload: bytes, caller: str) -> governance_store.Study:
    request = silo_protocol.decode(
      study_request.StudyRequest, payload, what=f'the {silo_protocol.SUBMIT_STUDY} request'
    )
    return self._gate.submit_study(request, caller)

  def _study_status(self, payload: bytes, caller: str) -> governance_store.Study:
    request = silo_protocol.decode(
      silo_protocol.StudyStatusRequest, payload, what=f'the {silo_protocol.STUDY_STATUS} request'
    )
    return self._gate.study_status(request.study_id, caller)

  def _submit_statistics_study(self, payload: bytes, caller: str) -> governance_store.Study:
    query = silo_protocol.decode(
      statistics_query.StatisticsQuery,
      payload,
      what=f'the {silo_protocol.SUBMIT_STATISTICS_STUDY} request',
    )
    return self._gate.submit_statistics_study(query, caller)

  def _release_statistics(
    self, payload: bytes, caller: str
  ) -> silo_protocol.ReleaseStatisticsReply:
    request = silo_protocol.decode(
      silo_protocol.ReleaseStatisticsRequest,
      payload,
      what=f'the {silo_protocol.RELEASE_STATISTICS} request',
    )
    released = self._gate.release_statistics(request.study_id, request.query, caller)
    return silo_protocol.ReleaseStatisticsReply(silo=self.silo_name, **released)

  def _study_handler(
    self,
    method: str,
    serve: Callable[[bytes, str], Any],
    reply: Callable[[Any], Any] = silo_protocol.StudyStatusReply.from_study,
  ) -> Callable[[bytes, grpc.ServicerContext], bytes]:
    """A governed `fedpipe.Silo` method: `reply(serve(payload, caller))`, its errors as
    `silo_protocol` maps them."""

    def handle(payload: bytes, context: grpc.ServicerContext) -> bytes:
      caller = self._admit(context)  # A stranger learns nothing, not even a payload's faults.
      try:
        study = serve(payload, caller)
      except FedpipeError as e:
        LOG.warning(
          json.dumps(
            {
              'event': 'study_request_refused',
              'silo': self.silo_name,
              'method': method,
              'caller': caller,
              'code': silo_protocol.status_code(e).name,
              'reason': str(e)[:2000],
            }
          )
        )
        silo_protocol.abort(context, e, silo=self.silo_name)
      except Exception:
        LOG.exception(
          json.dumps(
            {'event': 'internal_error', 'silo': self.silo_name, 'method': method, 'caller': caller}
          )
        )
        context.abort(
          grpc.StatusCode.INTERNAL,
          f"silo {self.silo_name}: {method} failed inside the silo; the silo's log has the error",
        )
      return silo_protocol.encode(reply(study))

    return handle

  def start(self) -> SiloServer:
    """Loads the manifest, starts the worker, then serves.

    Raises:
      SiloStartError: If the data directory, TLS files, worker or listen
        address is unusable.
    """
    if self._data_dir is None and not hasattr(self._gate, 'release_statistics'):
      raise SiloStartError(
        'a silo without --data_dir only serves statistics studies, which need --policy, '
        '--state_dir and --raw_data'
      )
    manifest = None
    try:
      if self._data_dir is not None:
        manifest = manifest_lib.read_manifest(self._data_dir)
      tls_context = self._tls.server_ssl_context()
    except (manifest_lib.ManifestError, tls_lib.TlsConfigError) as e:
      raise SiloStartError(str(e)) from e
    if manifest is not None:
      self._manifest_reply = silo_protocol.encode(
        silo_protocol.ManifestReply(silo=self.silo_name, manifest=manifest)
      )
    try:
      self._link.start()
    except (isolated_worker.WorkerIsolationError, isolated_worker.WorkerStartError) as e:
      raise SiloStartError(str(e)) from e
    server = grpc.server(
      concurrent.futures.ThreadPoolExecutor(max_workers=self._max_workers),
      options=GRPC_OPTIONS,
    )
    proxy = ExecutorProxy(
      self._link, silo_name=self.silo_name, gate=self._gate, identify=self._caller
    )
    executor_pb2_grpc.add_ExecutorGroupServicer_to_server(proxy, server)
    health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
    silo_methods = {silo_protocol.GET_MANIFEST: self._get_manifest}
    if hasattr(self._gate, 'submit_study'):  # A StudyGate; ungoverned: UNIMPLEMENTED.
      silo_methods[silo_protocol.SUBMIT_STUDY] = self._study_handler(
        silo_protocol.SUBMIT_STUDY, self._submit_study
      )
      silo_methods[silo_protocol.STUDY_STATUS] = self._study_handler(
        silo_protocol.STUDY_STATUS, self._study_status
      )
      rounds = secure_rounds.SecureRounds(
        gate=self._gate, silo_name=self.silo_name, tls=self._tls, compute=proxy.compute_for
      )
      for method, payload_type, serve in (
        (silo_protocol.SECURE_KEYS, silo_protocol.SecureRoundRequest, rounds.keys),
        (silo_protocol.SECURE_CONFIRM, silo_protocol.SecureConfirmRequest, rounds.confirm),
        (silo_protocol.SECURE_RELEASE, silo_protocol.SecureReleaseRequest, rounds.release),
      ):

        def handle(payload, caller, payload_type=payload_type, serve=serve, method=method):
          request = silo_protocol.decode(payload_type, payload, what=f'the {method} request')
          return serve(request, caller)

        silo_methods[method] = self._study_handler(method, handle, reply=lambda r: r)
    if hasattr(self._gate, 'release_statistics'):
      silo_methods[silo_protocol.SUBMIT_STATISTICS_STUDY] = self._study_handler(
        silo_protocol.SUBMIT_STATISTICS_STUDY, self._submit_statistics_study
      )
      silo_methods[silo_protocol.RELEASE_STATISTICS] = self._study_handler(
        silo_protocol.RELEASE_STATISTICS, self._release_statistics, reply=lambda r: r
      )
    server.add_generic_rpc_handlers(
      [
        grpc.method_handlers_generic_handler(
          silo_protocol.SILO_SERVICE,
          {
            name: grpc.unary_unary_rpc_method_handler(
              handler, request_deserializer=None, response_serializer=None
            )
            for name, handler in silo_methods.items()
          },
        )
      ]
    )
    # gRPC serves loopback only, in plaintext: the TLS front on `listen` does
    # the handshakes (and logs the failed ones) and relays to it.
    self._internal_port = server.add_insecure_port('127.0.0.1:0')
    if not self._internal_port:
      self._link.stop()
      raise SiloStartError('cannot listen on a loopback port (127.0.0.1:0) for the gRPC server')
    server.start()
    front = tls_front.TlsFront(
      listen=self._listen,
      context=tls_context,
      backend_port=self._internal_port,
      silo_name=self.silo_name,
      logger=LOG,
    )
    self._front = front  # Before it accepts: its first callers are looked up in it.
    try:
      self.port = front.start()
    except tls_front.TlsFrontError as e:
      self._front = None
      server.stop(None)
      self._link.stop()
      raise SiloStartError(str(e)) from e
    self._server = server
    self._set_serving(True)
    self._watcher = threading.Thread(target=self._watch_worker, name='worker-watch', daemon=True)
    self._watcher.start()
    LOG.info(
      json.dumps(
        {
          'event': 'serving',
          'silo': self.silo_name,
          'address': self.address,
          'internal_address': f'127.0.0.1:{self._internal_port}',
          'clients': {s: len(m.clients) for s, m in manifest.splits.items()} if manifest else {},
          'statistics_only': manifest is None,
          'governed': self._gate is not None,
          'worker_target': self._link.worker.target if self._link.worker else None,
        }
      )
    )
    return self

  def _set_serving(self, serving: bool) -> None:
    status = (
      health_pb2.HealthCheckResponse.SERVING
      if serving
      else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for service in silo_protocol.HEALTH_SERVICES:
      self._health.set(service, status)

  def _watch_worker(self) -> None:
    while not self._stop.wait(_WATCH_INTERVAL_S):
      if self._link.alive():
        continue
      self._set_serving(False)
      worker = self._link.worker
      # Without --worker_log the log goes with the worker's directory: keep its end.
      LOG.error(
        json.dumps(
          {
            'event': 'worker_died',
            'silo': self.silo_name,
            'restarts': self._link.restarts,
            'log_tail': worker.log_tail() if worker else '',
          }
        )
      )
      self._link.stop()
      try:
        self._link.start()
        self._link.restarts += 1
        self._set_serving(True)
        LOG.info(json.dumps({'event': 'worker_restarted', 'silo': self.silo_name}))
      except (isolated_worker.WorkerIsolationError, isolated_worker.WorkerStartError) as e:
        LOG.error(
          json.dumps({'event': 'worker_restart_failed', 'silo': self.silo_name, 'error': str(e)})
        )

  def worker_pid(self) -> int | None:
    worker = self._link.worker
    return worker.pid if worker else None

  def stop(self, grace: float = 5.0) -> None:
    """Stops serving (in-flight calls get `grace` seconds) and ends the worker."""
    self._stop.set()
    if self._front is not None:
      self._front.stop_accepting()
    if self._server is not None:
      self._set_serving(False)
      self._server.stop(grace).wait()
      self._server = None
    if self._front is not None:
      self._front.stop()
      self._front = None
    if self._watcher is not None:
      self._watcher.join(timeout=5)
    self._link.stop()
    LOG.info(json.dumps({'event': 'stopped', 'silo': self.silo_name}))

  def request_stop(self) -> None:
    """Makes `wait()` return (safe from a signal handler)."""
    self._stop.set()

  def wait(self) -> None:
    """Blocks until `stop()` is called."""
    self._stop.wait()
