"""The coordinator side of cross-silo training: route each client to the silo holding it.

TFF's `MergeableCompExecutionContext` splits clients by position and runs the
merge and the server-side finish on one of its workers, which would hand a
silo the other silos' un-noised partial sums. `SiloRoutingContext` instead

1. compiles a computation to TFF's mergeable form (up_to_merge, merge,
   after_merge);
2. runs `up_to_merge` on every silo that holds some of the round's clients,
   in parallel, passing each silo the local ids of its own clients (the silo
   reads their data, the coordinator never does);
3. merges the partial aggregates and runs `after_merge` (DP noise, the
   server optimizer) on the coordinator's own isolated worker, which holds no
   data.

A silo that fails or times out during a round is named in a `SiloRoundError`
(which silo, how many and which clients, what it answered), or, if the run
allows it, dropped from that round: the round completes with the others, the
drop is logged and counted, and the silo is reconnected for the next round.

Clients are identified across the federation as `<silo>/<client id>`, and
the cohort engine's cohorts as `<silo>/<id>,<id>,...` (one silo's users
only): each goes whole to its silo. What a silo's share of a round counts
(the clients a failure names, `dropped_clients`) is users, not cohorts.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import tensorflow_federated as tff

from fedpipe.data import client_ids as client_ids_lib
from fedpipe.data import manifest as manifest_lib
from fedpipe.errors import FedpipeError
from fedpipe.federation import secure_round, silo_protocol
from fedpipe.federation import tls as tls_lib
from fedpipe.governance import study_request
from fedpipe.runtime import execution_context, isolated_worker, rpc_errors
from fedpipe.statistics import query as statistics_query

LOG = logging.getLogger('fedpipe.coordinator')

SEPARATOR = client_ids_lib.SILO_SEPARATOR
ON_FAILURE = ('fail', 'drop')
# Detects a silo that vanished without closing its connection; the silo
# server accepts pings this often (silo_server.GRPC_OPTIONS).
_KEEPALIVE_OPTIONS = (
  ('grpc.keepalive_time_ms', 30_000),
  ('grpc.keepalive_timeout_ms', 10_000),
)
_SILO_NAME_RE = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}')


class SiloError(FedpipeError, RuntimeError):
  """A silo could not serve; the message names it and what happened."""

  def __init__(self, silo: str, message: str):
    self.silo = silo
    super().__init__(message)


class SiloUnavailableError(SiloError):
  """A silo could not be reached, or refused us, when the run started."""


class SiloRoundError(SiloError):
  """A silo failed or timed out during a round."""


class SiloNotGovernedError(SiloError):
  """The silo takes no study requests: it runs with --allow_ungoverned."""


class FederationError(FedpipeError, ValueError):
  """The silos' configuration or manifests do not fit together."""


@dataclasses.dataclass(frozen=True)
class SiloAddress:
  """A silo to connect to: its name in the federation and its `host:port`."""

  name: str | None
  address: str


def parse_silos(spec: str) -> list[SiloAddress]:
  """Parses `name=host:port,host:port,...` (names default to the silo's own).

  Raises:
    FederationError: If an entry is not `[name=]host:port`.
  """
  silos = []
  for entry in (e.strip() for e in spec.split(',')):
    if not entry:
      continue
    name, _, address = entry.rpartition('=')
    host, _, port = address.rpartition(':')
    if not host or not port.isdigit() or (name and not _SILO_NAME_RE.fullmatch(name)):
      raise FederationError(
        f'silo {entry!r} is not [name=]host:port (e.g. hospital-a=10.0.0.5:8443)'
      )
    silos.append(SiloAddress(name or None, address))
  if not silos:
    raise FederationError('no silos given: set --silos=host:port,... or config.runtime.silos')
  return silos


def global_client_id(silo: str, client_id: str) -> str:
  return f'{silo}{SEPARATOR}{client_id}'


def _round_failure(error: BaseException, timeout_s: float) -> str:
  """One line for why a silo's share of a round failed: a timeout, its gRPC status, or the error."""
  rpc = rpc_errors.find_rpc_error(error)
  timed_out = (
    rpc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    if rpc is not None
    else isinstance(error, asyncio.TimeoutError)
  )
  if timed_out:
    return f'no answer within silo_round_timeout_s={timeout_s:g}s (frozen or unreachable)'
  return rpc_errors.error_summary(error)


class _RoundDeadline(grpc.UnaryUnaryClientInterceptor):
  """Gives every call on a channel at most the time left until a deadline.

  TFF's remote executor makes blocking gRPC calls without timeouts, from
  inside its coroutines: a silo that stops answering (frozen, or a network
  that drops packets) holds the call, and the event loop with it, until TCP
  keepalive notices, minutes later. A deadline on each call ends it in time,
  with DEADLINE_EXCEEDED.
  """

  def __init__(self):
    self.deadline: float | None = None  # time.monotonic(); None: no deadline.

  def intercept_unary_unary(self, continuation, client_call_details, request):
    if self.deadline is not None:
      left = max(self.deadline - time.monotonic(), 0.001)
      timeout = client_call_details.timeout
      client_call_details = _CallDetails(
        client_call_details.method,
        left if timeout is None else min(timeout, left),
        client_call_details.metadata,
        client_call_details.credentials,
        client_call_details.wait_for_ready,
        client_call_details.compression,
      )
    return continuation(client_call_details, request)


class _CallDetails(
  collections.namedtuple(
    '_CallDetails',
    ('method', 'timeout', 'metadata', 'credentials', 'wait_for_ready', 'compression'),
  ),
  grpc.ClientCallDetails,
):
  pass


class SiloConnection:
  """A mutual-TLS channel to one silo, and a TFF async context over it on a thread of its own.

  TFF's remote executor makes blocking gRPC calls from inside its coroutines,
  so a silo's calls run on this connection's own event-loop thread: the
  silos of a round work in parallel, and a silo that stops answering holds
  only its own thread, never the others' or the coordinator's.
  """

  def __init__(self, address: SiloAddress, tls: tls_lib.TlsFiles):
    self.address = address.address
    self.name = address.name or address.address
    self._credentials = tls.channel_credentials()
    self.channel: grpc.Channel | None = None
    self.context: tff.framework.AsyncExecutionContext | None = None
    self._deadline = _RoundDeadline()
    self._loop = asyncio.new_event_loop()
    self._thread = threading.Thread(
      target=self._loop.run_forever, name=f'silo-{self.name}', daemon=True
    )
    self._thread.start()
    self._open()

  def _open(self) -> None:
    self.channel = grpc.secure_channel(
      self.address,
      self._credentials,
      options=execution_context.CHANNEL_OPTIONS + _KEEPALIVE_OPTIONS,
    )
    self.context = execution_context.create_async_context(
      grpc.intercept_channel(self.channel, self._deadline)
    )

  @contextlib.contextmanager
  def deadline(self, seconds: float) -> Iterator[None]:
    """Bounds every call made on this connection in the block to `seconds` in all."""
    self._deadline.deadline = time.monotonic() + seconds
    try:
      yield
    finally:
      self._deadline.deadline = None

  def submit(self, comp, arg, *, timeout_s: float) -> concurrent.futures.Future:
    """Starts `comp(arg)` on this silo; every call it makes must end within `timeout_s`."""
    context = self.context

    async def invoke():
      with self.deadline(timeout_s):
        return await context.invoke(comp, arg)

    return asyncio.run_coroutine_threadsafe(invoke(), self._loop)

  def _close_channel(self) -> None:
    if self.channel is not None:
      self.channel.close()
    self.channel = self.context = None

  def reconnect(self) -> None:
    """Drops the channel (cancelling calls in flight) and opens a fresh one."""
    self._close_channel()
    self._open()

  def close(self) -> None:
    """Closes the channel and ends the connection's thread."""
    self._close_channel()
    if self._thread.is_alive():
      self._loop.call_soon_threadsafe(self._loop.stop)
      self._thread.join(timeout=5)

  def fetch_manifest(self, timeout_s: float) -> tuple[str, manifest_lib.Manifest]:
    """The silo's own name and its manifest.

    Raises:
      SiloUnavailableError: If the silo cannot be reached, refuses us or
        sends a malformed manifest.
    """
    call = self.channel.unary_unary(silo_protocol.method_path(silo_protocol.GET_MANIFEST))
    try:
      data = call(b'', timeout=timeout_s, wait_for_ready=True)
    except grpc.RpcError as e:
      raise SiloUnavailableError(
        self.name,
        f'silo {self.name} at {self.address} is unavailable: {rpc_errors.rpc_summary(e)}. '
        'Check that it runs (grpc health check), that the address is right and reachable, '
        'and that our client certificate is signed by the CA it trusts.',
      ) from e
    try:
      reply = silo_protocol.decode(
        silo_protocol.ManifestReply, data, what=f'the manifest of silo {self.name}'
      )
    except silo_protocol.PayloadError as e:
      raise SiloUnavailableError(
        self.name, f'silo {self.name} sent a malformed manifest: {e}'
      ) from e
    return reply.silo, reply.manifest

  def _call(self, method: str, request: bytes, timeout_s: float) -> bytes:
    """Calls a study method of `fedpipe.Silo`.

    Raises:
      SiloNotGovernedError: If the silo takes no study requests.
      SiloError: Naming this silo and what it answered.
    """
    call = self.channel.unary_unary(silo_protocol.method_path(method))
    try:
      return call(request, timeout=timeout_s, wait_for_ready=True)
    except grpc.RpcError as e:
      if e.code() == grpc.StatusCode.UNIMPLEMENTED:
        raise SiloNotGovernedError(
          self.name,
          f'silo {self.name} is not governed: it takes no study '
          'requests (it runs with --allow_ungoverned)',
        ) from e
      raise SiloError(
        self.name,
        f'silo {self.name} ({self.address}) refused {method}: {rpc_errors.rpc_summary(e)}',
      ) from e

  def call_silo(self, method: str, request: bytes, timeout_s: float) -> bytes:
    """Calls a governed `fedpipe.Silo` method (a study or secure-round one) with its payload.

    Raises:
      SiloNotGovernedError: If the silo takes no study requests.
      SiloError: Naming this silo and what it answered.
    """
    return self._call(method, request, timeout_s)

  def _status_reply(self, method: str, data: bytes) -> silo_protocol.StudyStatusReply:
    try:
      return silo_protocol.decode(
        silo_protocol.StudyStatusReply, data, what=f'the {method} reply of silo {self.name}'
      )
    except silo_protocol.PayloadError as e:
      raise SiloError(self.name, f'silo {self.name} sent a malformed {method} reply: {e}') from e

  def submit_study(
    self, request: study_request.StudyRequest, timeout_s: float
  ) -> silo_protocol.StudyStatusReply:
    """Submits `request` for approval (idempotent); the study's status at this silo.

    Raises:
      SiloNotGovernedError: If the silo takes no study requests.
      SiloError: If it refuses the request or answers malformed.
    """
    method = silo_protocol.SUBMIT_STUDY
    return self._status_reply(method, self._call(method, silo_protocol.encode(request), timeout_s))

  def submit_statistics_study(
    self, query: statistics_query.StatisticsQuery, timeout_s: float
  ) -> silo_protocol.StudyStatusReply:
    """Submits a statistics study for approval (idempotent); its status at this silo.

    Raises:
      SiloNotGovernedError: If the silo takes no study requests.
      SiloError: If it refuses the query (no raw data, malformed) or answers malformed.
    """
    method = silo_protocol.SUBMIT_STATISTICS_STUDY
    return self._status_reply(method, self._call(method, silo_protocol.encode(query), timeout_s))

  def release_statistics(
    self, study_id: str, query: statistics_query.StatisticsQuery, timeout_s: float
  ) -> silo_protocol.ReleaseStatisticsReply:
    """Asks the silo for one release of the approved statistics study: its noised statistics.

    Raises:
      SiloNotGovernedError: If the silo takes no study requests.
      SiloError: If it refuses (not approved, no release left, another query) or answers
        malformed.
    """
    method = silo_protocol.RELEASE_STATISTICS
    request = silo_protocol.ReleaseStatisticsRequest(study_id, query)
    data = self._call(method, silo_protocol.encode(request), timeout_s)
    try:
      return silo_protocol.decode(
        silo_protocol.ReleaseStatisticsReply, data, what=f'the {method} reply of silo {self.name}'
      )
    except silo_protocol.PayloadError as e:
      raise SiloError(self.name, f'silo {self.name} sent a malformed {method} reply: {e}') from e

  def study_status(self, study_id: str, timeout_s: float) -> silo_protocol.StudyStatusReply:
    """The status at this silo of the study `study_id` we submitted.

    Raises:
      SiloNotGovernedError: If the silo takes no study requests.
      SiloError: If it knows no such study of ours, refuses us or answers malformed.
    """
    method = silo_protocol.STUDY_STATUS
    request = silo_protocol.encode(silo_protocol.StudyStatusRequest(study_id))
    return self._status_reply(method, self._call(method, request, timeout_s))


def union_manifest(manifests: dict[str, manifest_lib.Manifest]) -> manifest_lib.Manifest:
  """One manifest over all silos, with `<silo>/<client>` ids.

  Raises:
    FederationError: If the silos' feature specs differ, or their data are
      stored in different layouts (`storage`: one computation reads them all).
  """
  names = sorted(manifests)
  first = manifests[names[0]]
  storages = {name: manifests[name].storage for name in names}
  if len(set(storages.values())) > 1:
    old = [n for n in names if storages[n] != manifest_lib.STORAGE_SQLITE]
    raise FederationError(
      'silos hold their client data in different layouts ('
      + ', '.join(f'{n}: {storages[n]}' for n in names)
      + '); one computation reads every silo, so they must match: re-run fedpipe-preprocess '
      f'at silo(s) {", ".join(old)} to rewrite their data as {manifest_lib.STORAGE_SQLITE!r}, '
      'then restart them'
    )
  for name in names[1:]:
    other = manifests[name]
    if (
      dict(other.feature_spec),
      other.num_features,
      other.num_classes,
      other.label_task,
      other.weighted,
    ) != (
      dict(first.feature_spec),
      first.num_features,
      first.num_classes,
      first.label_task,
      first.weighted,
    ):
      raise FederationError(
        f'silos {names[0]} and {name} hold data of different feature specs; every silo '
        'must preprocess with the same feature_spec.json'
      )
  splits = {}
  for split in manifest_lib.SPLITS:
    clients, excluded = {}, {}
    for name in names:
      if split in manifests[name].splits:
        part = manifests[name].splits[split]
        clients.update({global_client_id(name, c): n for c, n in part.clients.items()})
        excluded.update({global_client_id(name, c): n for c, n in part.excluded_clients.items()})
    splits[split] = manifest_lib.SplitManifest(clients=clients, excluded_clients=excluded)
  return manifest_lib.Manifest(
    feature_spec=first.feature_spec,
    splits=splits,
    num_features=first.num_features,
    num_classes=first.num_classes,
    label_task=first.label_task,
    weighted=first.weighted,
    extra={
      'silos': {n: {s: len(m.splits[s].clients) for s in m.splits} for n, m in manifests.items()}
    },
    storage=first.storage,
  )


def _has_clients_placement(type_spec: tff.Type | None) -> bool:
  if type_spec is None:
    return False
  return tff.types.contains(
    type_spec, lambda t: isinstance(t, tff.FederatedType) and t.placement is tff.CLIENTS
  )


def _route_clients(value: Any, type_spec: tff.Type, route) -> Any:
  """Rebuilds `value`, replacing each CLIENTS-placed list with `route(list)`."""
  if isinstance(type_spec, tff.StructType):
    elements = tff.structure.iter_elements(tff.structure.from_container(value))
    return tff.structure.Struct(
      [
        (name, _route_clients(v, t, route))
        for (name, v), (_, t) in zip(elements, tff.structure.iter_elements(type_spec))
      ]
    )
  if (
    isinstance(type_spec, tff.FederatedType)
    and type_spec.placement is tff.CLIENTS
    and not type_spec.all_equal
  ):
    return route(list(value))
  return value


class SiloRoutingContext(tff.framework.SyncContext):
  """Runs client work on the silos that hold the clients; server work locally."""

  def __init__(
    self,
    silos: dict[str, SiloConnection],
    server_context: tff.framework.AsyncExecutionContext,
    *,
    on_failure: str = 'fail',
    round_timeout_s: float = 600.0,
    min_silos_per_round: int = 1,
  ):
    if on_failure not in ON_FAILURE:
      raise FederationError(f'on_failure must be one of {ON_FAILURE}, got {on_failure!r}')
    self._silos = silos
    self._server = server_context
    self._on_failure = on_failure
    self._timeout = round_timeout_s
    self._min_silos = min_silos_per_round
    self._forms: dict[int, tuple[Any, Any]] = {}
    self._secure_function: tuple[int, Any] | None = None  # (id(comp), its serialized silo half)
    self._loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self._loop.run_forever, name='silo-routing', daemon=True)
    self._thread.start()
    self._dropped: list[dict[str, Any]] = []
    self._secure: tuple[secure_round.SecureStudy, int] | None = None
    # Secure rounds are numbered by an increasing counter, not the training
    # round: a silo makes keys only for rounds newer than any it keyed, and
    # a resumed or restarted run must never reuse a number.
    self._secure_round = int(time.time() * 1000)

  def enable_secure(self, study: secure_round.SecureStudy, comp) -> None:
    """From now on `comp` (the training computation) runs as secure-aggregation rounds."""
    self._secure = (study, id(comp))

  def close(self) -> None:
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join(timeout=5)

  def pop_round_metrics(self) -> dict[str, float]:
    """Silos and clients dropped since the last call (logged when they happened)."""
    dropped, self._dropped = self._dropped, []
    return {
      'dropped_silos': float(len(dropped)),
      'dropped_clients': float(sum(d['clients'] for d in dropped)),
    }

  def _run(self, coro):
    return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

  def mergeable_form(self, comp) -> Any:
    """The `MergeableCompForm` this context runs `comp` as (built once, then cached)."""
    key = id(comp)
    if key not in self._forms:
      self._forms[key] = (comp, tff.backends.native.compile_to_mergeable_comp_form(comp))
    return self._forms[key][1]

  def silo_computation(self, comp) -> Any:
    """The computation proto each silo receives for `comp` (its `up_to_merge`)."""
    return execution_context.wire_computation(self.mergeable_form(comp).up_to_merge)

  def _split_by_silo(self, client_ids: list[str]) -> dict[str, list[str]]:
    by_silo: dict[str, list[str]] = {}
    for gid in client_ids:
      silo, sep, local = str(gid).partition(SEPARATOR)
      if not sep or silo not in self._silos:
        raise FederationError(f'client {gid!r} belongs to no connected silo')
      by_silo.setdefault(silo, []).append(local)
    return by_silo

  def invoke(self, comp, arg):
    if not _has_clients_placement(comp.type_signature.parameter):
      return self._run(self._server.invoke(comp, arg))
    secure = self._secure is not None and self._secure[1] == id(comp)
    form = self.mergeable_form(comp)
    param_type = form.up_to_merge.type_signature.parameter
    assignment: dict[str, list[str]] = {}

    def collect(ids):
      for silo, local in self._split_by_silo(ids).items():
        # The users (a cohort names several), for messages and drop counts.
        assignment.setdefault(silo, []).extend(
          user for value in local for user in client_ids_lib.cohort_members(value)
        )
      return ids

    _route_clients(arg, param_type, collect)
    parts = {
      silo: _route_clients(arg, param_type, lambda ids, s=silo: self._split_by_silo(ids).get(s, []))
      for silo in sorted(assignment)
    }
    after_merge_arg = _route_clients(arg, param_type, lambda ids: [])
    invoke_form = self._invoke_secure if secure else self._invoke_form
    result = self._run(invoke_form(form, parts, assignment, after_merge_arg))
    return tff.tensorflow.transform_result(
      tff.types.type_to_py_container(result, comp.type_signature.result)
    )

  async def _up_to_merge(self, silo: str, form, part):
    future = self._silos[silo].submit(form.up_to_merge, part, timeout_s=self._timeout)
    # The silo's calls end by their deadline; the margin covers the gRPC
    # deadline's own lateness.
    return await asyncio.wait_for(asyncio.wrap_future(future), timeout=self._timeout + 5)

  async def _invoke_form(self, form, parts, assignment, after_merge_arg):
    if parts:
      names = list(parts)
      results = await asyncio.gather(
        *(self._up_to_merge(n, form, parts[n]) for n in names), return_exceptions=True
      )
    else:  # No client sampled this round: aggregate over nobody, on the server.
      names, results = ['<none>'], [await self._server.invoke(form.up_to_merge, after_merge_arg)]
    partials, failures = [], []
    for name, result in zip(names, results):
      if isinstance(result, BaseException):
        failures.append((name, result))
      else:
        partials.append(result)
    for name, error in failures:
      self._silos[name].reconnect()
      clients = assignment[name]
      message = (
        f'silo {name} ({self._silos[name].address}) failed during the round with '
        f'{len(clients)} of its clients ({", ".join(clients[:5])}'
        f'{", ..." if len(clients) > 5 else ""}): {_round_failure(error, self._timeout)}'
      )
      if self._on_failure == 'fail' or len(partials) < max(self._min_silos, 1):
        raise SiloRoundError(name, message) from error
      LOG.warning(
        json.dumps(
          {
            'event': 'silo_dropped',
            'silo': name,
            'clients': len(clients),
            'error': _round_failure(error, self._timeout),
          }
        )
      )
      self._dropped.append({'silo': name, 'clients': len(clients)})
    merged = partials[0]
    for partial in partials[1:]:
      merged = await self._server.invoke(form.merge, tff.structure.Struct.unnamed(merged, partial))
    if after_merge_arg is None:
      arg = merged
    else:
      arg = tff.structure.Struct.unnamed(after_merge_arg, merged)
    return await self._server.invoke(form.after_merge, arg)

  async def _secure_call(self, name: str, send):
    try:
      return await asyncio.wait_for(asyncio.to_thread(send), timeout=self._timeout + 5)
    except (SiloError, grpc.RpcError, silo_protocol.PayloadError, TimeoutError) as e:
      raise secure_round.SecureRoundError(name, _round_failure(e, self._timeout)) from e

  def _dispose(self, name: str, executor_id: str) -> None:
    try:
      secure_round.dispose(self._silos[name].channel, executor_id, timeout_s=10)
    except grpc.RpcError:
      pass  # The silo forgets executors it no longer tracks.

  async def _invoke_secure(self, form, parts, assignment, after_merge_arg):
    """A secure-aggregation round (`secure_round`); a failed attempt is rerun without the
    failed silo (fresh keys, fresh noise) if `on_failure` allows, else the run stops."""
    study, comp_id = self._secure
    if self._secure_function is None or self._secure_function[0] != comp_id:
      self._secure_function = (comp_id, secure_round.serialize_function(form.up_to_merge))
    function = self._secure_function[1]
    self._secure_round += 1
    names = sorted(parts)
    fewest = max(self._min_silos, study.terms.max_colluding + 1, 2)
    attempt = 0
    while True:
      prepared: dict[str, Any] = {}
      try:
        calls = await asyncio.gather(
          *(
            self._secure_call(
              name,
              functools.partial(
                secure_round.prepare_call,
                self._silos[name].channel,
                form.up_to_merge,
                parts[name],
                timeout_s=self._timeout,
                function=function,
              ),
            )
            for name in names
          ),
          return_exceptions=True,
        )
        prepared = {n: c for n, c in zip(names, calls) if not isinstance(c, BaseException)}
        for call in calls:
          if isinstance(call, BaseException):
            raise call
        decoded, _, _ = await secure_round.run_attempt(
          study=study,
          round_number=self._secure_round,
          attempt=attempt,
          silos={n: self._silos[n] for n in names},
          prepared=prepared,
          timeout_s=self._timeout,
          call=self._secure_call,
        )
        break
      except secure_round.SecureRoundError as e:
        name = e.silo if e.silo in self._silos else names[0]
        self._silos[name].reconnect()
        clients = assignment.get(name, [])
        message = (
          f'silo {name} ({self._silos[name].address}) failed during the secure round with '
          f'{len(clients)} of its clients ({", ".join(clients[:5])}'
          f'{", ..." if len(clients) > 5 else ""}): {e}'
        )
        rpc = rpc_errors.find_rpc_error(e)
        refused = rpc is not None and rpc.code() in (
          grpc.StatusCode.FAILED_PRECONDITION,  # A verification failed: an attack, not a dropout.
          grpc.StatusCode.PERMISSION_DENIED,
          grpc.StatusCode.INVALID_ARGUMENT,
        )
        if refused or self._on_failure == 'fail' or len(names) - 1 < fewest:
          raise SiloRoundError(name, message) from e
        LOG.warning(
          json.dumps(
            {'event': 'silo_dropped', 'silo': name, 'clients': len(clients), 'error': str(e)}
          )
        )
        self._dropped.append({'silo': name, 'clients': len(clients)})
        names.remove(name)
        attempt += 1
      finally:
        await asyncio.gather(
          *(
            asyncio.to_thread(self._dispose, name, call.executor_id)
            for name, call in prepared.items()
          )
        )
    merged = secure_round.pack(decoded, form.merge.type_signature.result)
    if after_merge_arg is None:
      arg = merged
    else:
      arg = tff.structure.Struct.unnamed(after_merge_arg, merged)
    return await self._server.invoke(form.after_merge, arg)


@dataclasses.dataclass
class Federation:
  """Connected silos: their union manifest and the routing context."""

  manifest: manifest_lib.Manifest
  context: SiloRoutingContext
  silos: dict[str, SiloConnection]
  unavailable: dict[str, str]


@contextlib.contextmanager
def federation(
  silos: Sequence[SiloAddress],
  tls: tls_lib.TlsFiles,
  *,
  on_failure: str = 'fail',
  round_timeout_s: float = 600.0,
  connect_timeout_s: float = 30.0,
  min_silos_per_round: int = 1,
  server_log_path: str | None = None,
  allow_exposed_worker: bool = False,
  allow_unconfined_worker: bool = False,
) -> Iterator[Federation]:
  """Connects to the silos and installs a routing context for the block.

  Args:
    silos: The silos to train across.
    tls: The coordinator's client certificate and key, and the CA that signed
      the silos' server certificates.
    on_failure: 'fail': a silo that is down or fails stops the run with an
      error naming it; 'drop': continue without it (logged and counted).
    round_timeout_s: A silo's share of a round must finish within this.
    connect_timeout_s: How long to wait for each silo at the start.
    min_silos_per_round: With 'drop', the fewest silos a round may use.
    server_log_path: Log file of the coordinator's own (data-less) worker.
    allow_exposed_worker: See `IsolatedWorker`.
    allow_unconfined_worker: `IsolatedWorker`'s `allow_unconfined_filesystem`.

  Yields:
    A `Federation`.

  Raises:
    SiloUnavailableError: A silo is unreachable and `on_failure='fail'`, or
      too few silos are reachable.
    FederationError: Silo names collide or their data do not fit together.
    tls_lib.TlsConfigError: A TLS file is unusable.
  """
  execution_context.refuse_unisolated_default_context()
  connections: dict[str, SiloConnection] = {}
  manifests: dict[str, manifest_lib.Manifest] = {}
  unavailable: dict[str, str] = {}
  try:
    for address in silos:
      connection = SiloConnection(address, tls)
      try:
        reported, manifest = connection.fetch_manifest(connect_timeout_s)
      except SiloUnavailableError as e:
        connection.close()
        if on_failure == 'fail':
          raise
        unavailable[connection.name] = str(e)
        LOG.warning(
          json.dumps({'event': 'silo_unavailable', 'silo': connection.name, 'error': str(e)})
        )
        continue
      if address.name is None and reported and _SILO_NAME_RE.fullmatch(reported):
        connection.name = reported
      if connection.name in connections:
        connection.close()
        raise FederationError(
          f'two silos are named {connection.name!r}; name them with name=host:port'
        )
      connections[connection.name] = connection
      manifests[connection.name] = manifest
    if len(connections) < max(min_silos_per_round, 1):
      raise SiloUnavailableError(
        ','.join(unavailable),
        f'only {len(connections)} silo(s) reachable; '
        f'{min_silos_per_round} needed: ' + '; '.join(unavailable.values()),
      )
    union = union_manifest(manifests)
    with isolated_worker.IsolatedWorker(
      working_dir=None,
      log_path=server_log_path,
      allow_exposed=allow_exposed_worker,
      allow_unconfined_filesystem=allow_unconfined_worker,
    ) as server_worker:
      server_channel = grpc.insecure_channel(
        server_worker.target, options=execution_context.CHANNEL_OPTIONS
      )
      routing = SiloRoutingContext(
        connections,
        execution_context.create_async_context(server_channel),
        on_failure=on_failure,
        round_timeout_s=round_timeout_s,
        min_silos_per_round=min_silos_per_round,
      )
      try:
        with tff.framework.get_context_stack().install(routing):
          yield Federation(union, routing, connections, unavailable)
      finally:
        routing.close()
        server_channel.close()
  finally:
    for connection in connections.values():
      connection.close()
