"""A mutual-TLS front for a gRPC server, which logs the handshakes it refuses.

gRPC Python gives a server no hook for failed TLS handshakes: grpc core only
logs them, at INFO verbosity and without the peer's address. A silo
therefore terminates TLS itself, in this front, and relays the plaintext
HTTP/2 bytes to its gRPC server, which listens on loopback only:

* every accepted connection does the TLS handshake here (TLS >= 1.2, a client
  certificate signed by the silo's CA required, ALPN `h2`), bounded in time;
* a failed handshake is one `tls_handshake_failed` JSON event with the
  peer's address, rate-limited per peer IP and per window, with a
  `tls_handshake_failures_suppressed` count for what the limits held back;
* an authenticated connection is relayed to the gRPC server over a fresh
  loopback connection whose local address is registered, before its first
  byte, with the common name of the caller's certificate: the gRPC server's
  servicers resolve `context.peer()` through `caller_of`, and a connection
  the front did not open (a local process bypassing TLS) has no identity.

The front runs its own asyncio event loop in a daemon thread and streams
bytes in chunks of up to 1 MiB with backpressure: it never holds a whole
gRPC message.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import ssl
import threading
import time
from typing import Any

from fedpipe.errors import FedpipeError

_CHUNK_BYTES = 1 << 20
_WRITE_HIGH_WATER_BYTES = 4 << 20
HANDSHAKE_TIMEOUT_S = 10.0
# Handshakes in progress at once; more connections are closed at once (and
# logged like failed handshakes), so slow clients cannot pile up.
MAX_HANDSHAKES = 128
# After one side half-closes, how long the other direction may still run.
_HALF_CLOSE_GRACE_S = 10.0
_START_TIMEOUT_S = 30.0
# Default limits of `tls_handshake_failed` events.
FAILURES_PER_PEER = 10
FAILURES_PER_WINDOW = 100
FAILURE_WINDOW_S = 60.0
_STOP_TIMEOUT_S = 10.0


class TlsFrontError(FedpipeError, RuntimeError):
  """The front cannot start; the message says what to fix."""


class RateLimitedEvents:
  """JSON log events of one kind, at most so many per peer IP and per window.

  Events beyond the limits are counted, not logged; at the end of each
  window (see `roll`) and on `flush`, one `<suppressed_event>` says how many
  were held back and from which peers. Thread-safe.
  """

  _NAMED_PEERS = 20

  def __init__(
    self,
    logger: logging.Logger,
    *,
    event: str,
    suppressed_event: str,
    silo_name: str,
    per_peer: int = FAILURES_PER_PEER,
    per_window: int = FAILURES_PER_WINDOW,
    window_s: float = FAILURE_WINDOW_S,
  ):
    """Configures the limits.

    Args:
      logger: Where events go (one JSON object per message).
      event: The `event` field of the logged events.
      suppressed_event: The `event` field of the suppressed-count summaries.
      silo_name: The `silo` field of every event.
      per_peer: Events logged per peer IP per window.
      per_window: Events logged per window, all peers together.
      window_s: Window length in seconds.
    """
    self._logger = logger
    self._event = event
    self._suppressed_event = suppressed_event
    self._silo_name = silo_name
    self._per_peer = per_peer
    self._per_window = per_window
    self.window_s = window_s
    self._lock = threading.Lock()
    self._window_start = time.monotonic()
    self._logged: collections.Counter[str] = collections.Counter()
    self._suppressed: collections.Counter[str] = collections.Counter()
    self._suppressed_elsewhere = 0

  def emit(self, peer_host: str, fields: dict[str, Any]) -> None:
    """Logs `{event, silo, **fields}` at WARNING, unless a limit is reached."""
    with self._lock:
      self._roll_locked(time.monotonic())
      if self._logged[peer_host] < self._per_peer and sum(self._logged.values()) < self._per_window:
        self._logged[peer_host] += 1
        self._logger.warning(json.dumps({'event': self._event, 'silo': self._silo_name, **fields}))
      elif peer_host in self._suppressed or len(self._suppressed) < self._NAMED_PEERS:
        self._suppressed[peer_host] += 1
      else:
        self._suppressed_elsewhere += 1

  def roll(self) -> None:
    """Ends the window if it is over, logging what it suppressed."""
    with self._lock:
      self._roll_locked(time.monotonic())

  def flush(self) -> None:
    """Ends the window now, logging what it suppressed."""
    with self._lock:
      self._roll_locked(time.monotonic(), force=True)

  def _roll_locked(self, now: float, force: bool = False) -> None:
    if not force and now - self._window_start < self.window_s:
      return
    total = sum(self._suppressed.values()) + self._suppressed_elsewhere
    if total:
      self._logger.warning(
        json.dumps(
          {
            'event': self._suppressed_event,
            'silo': self._silo_name,
            'suppressed': total,
            'window_s': round(now - self._window_start, 1),
            'peers': dict(self._suppressed),
            'other_peers': self._suppressed_elsewhere,
          }
        )
      )
    self._window_start = now
    self._logged.clear()
    self._suppressed.clear()
    self._suppressed_elsewhere = 0


def _split_host_port(address: str) -> tuple[str, int]:
  host, sep, port = address.rpartition(':')
  if not sep or not port.isdigit():
    raise TlsFrontError(f'listen address {address!r} is not host:port; give e.g. 0.0.0.0:8443')
  return host.strip('[]'), int(port)


def _peer_text(peername: Any) -> tuple[str, str]:
  """(`host:port`, `host`) of a socket's peer name; ('unknown', 'unknown') if none."""
  if not peername:
    return 'unknown', 'unknown'
  host, port = peername[0], peername[1]
  return (f'[{host}]:{port}' if ':' in host else f'{host}:{port}'), host


def _handshake_error(error: BaseException) -> str:
  """The reason a handshake failed, as OpenSSL names it where it does."""
  if isinstance(error, ssl.SSLCertVerificationError):
    return f'{error.reason}: {error.verify_message}'
  if isinstance(error, ssl.SSLError) and error.reason:
    return error.reason
  if isinstance(error, (TimeoutError, asyncio.TimeoutError)):
    return f'no handshake within {HANDSHAKE_TIMEOUT_S:g}s'
  if isinstance(error, ConnectionAbortedError) and 'longer than' in str(error):
    return f'no handshake within {HANDSHAKE_TIMEOUT_S:g}s'
  if isinstance(error, (ConnectionResetError, EOFError)):
    return 'connection closed during the handshake'
  return type(error).__name__ + (f': {error}' if str(error) else '')


def _common_name(peercert: dict | None) -> str:
  for rdn in (peercert or {}).get('subject', ()):
    for key, value in rdn:
      if key == 'commonName':
        return value
  return ''


class TlsFront:
  """Terminates mutual TLS on `listen` and relays to a loopback gRPC server."""

  def __init__(
    self,
    *,
    listen: str,
    context: ssl.SSLContext,
    backend_port: int,
    silo_name: str,
    logger: logging.Logger,
    handshake_failures: RateLimitedEvents | None = None,
    unidentified: RateLimitedEvents | None = None,
  ):
    """Configures the front; `start()` starts it.

    Args:
      listen: `host:port` to accept TLS on; port 0 picks a free port.
      context: The server's TLS context (`tls.TlsFiles.server_ssl_context`):
        its certificate and the CA whose client certificates it accepts.
      backend_port: Port of the gRPC server on 127.0.0.1.
      silo_name: The `silo` field of the front's log events.
      logger: Where the front's JSON events go.
      handshake_failures: Limits for `tls_handshake_failed` events (default:
        10 per peer IP and 100 in all per minute).
      unidentified: Limits for `unauthenticated_connection` events, logged
        when `caller_of` is asked about a connection the front did not open.
    """
    self._listen = listen
    self._context = context
    self._backend_port = backend_port
    self._silo_name = silo_name
    self._logger = logger
    self._failures = handshake_failures or RateLimitedEvents(
      logger,
      event='tls_handshake_failed',
      suppressed_event='tls_handshake_failures_suppressed',
      silo_name=silo_name,
    )
    self._unidentified = unidentified or RateLimitedEvents(
      logger,
      event='unauthenticated_connection',
      suppressed_event='unauthenticated_connections_suppressed',
      silo_name=silo_name,
    )
    self._callers: dict[str, str] = {}
    self._callers_lock = threading.Lock()
    self._loop: asyncio.AbstractEventLoop | None = None
    self._thread: threading.Thread | None = None
    self._server: asyncio.base_events.Server | None = None
    self._connections: set[asyncio.Task] = set()
    self._handshaking = 0  # Only touched on the front's event loop.
    self._roller: asyncio.Task | None = None
    self.port: int | None = None

  def start(self) -> int:
    """Listens and serves in a thread of its own; returns the port.

    Raises:
      TlsFrontError: If the address cannot be listened on.
    """
    host, port = _split_host_port(self._listen)
    context = self._context
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name='tls-front', daemon=True)
    thread.start()
    try:
      future = asyncio.run_coroutine_threadsafe(self._open(host, port, context), loop)
      self.port = future.result(timeout=_START_TIMEOUT_S)
    except OSError as e:
      self._end_loop(loop, thread)
      reason = os.strerror(e.errno) if e.errno else str(e)
      raise TlsFrontError(
        f'cannot listen on {self._listen}: {reason}; stop what uses that '
        'address or choose another one'
      ) from e
    self._loop, self._thread = loop, thread
    return self.port

  async def _open(self, host: str, port: int, context: ssl.SSLContext) -> int:
    # The handshake runs in `_serve` (start_tls), not in the server: failures
    # then reach this code with the peer's address instead of being dropped.
    self._server = await asyncio.start_server(
      lambda reader, writer: self._track(self._serve(reader, writer, context)),
      host or None,
      port,
      limit=_CHUNK_BYTES,
      reuse_address=True,
    )
    self._roller = asyncio.get_running_loop().create_task(self._roll_periodically())
    return self._server.sockets[0].getsockname()[1]

  def _track(self, coroutine) -> None:
    task = asyncio.get_running_loop().create_task(coroutine)
    self._connections.add(task)
    task.add_done_callback(self._connections.discard)

  async def _roll_periodically(self) -> None:
    while True:
      await asyncio.sleep(min(self._failures.window_s, self._unidentified.window_s) / 4)
      self._failures.roll()
      self._unidentified.roll()

  def caller_of(self, peer: str) -> str | None:
    """The certificate common name behind a gRPC `context.peer()`.

    Args:
      peer: The gRPC server's view of the connection, `ipv4:127.0.0.1:PORT`.

    Returns:
      The common name ('' for a certificate without one), or None if the
      front did not open that connection: the caller bypassed TLS. Such
      lookups are logged, rate-limited, as `unauthenticated_connection`.
    """
    with self._callers_lock:
      name = self._callers.get(peer)
    if name is None:
      self._unidentified.emit('loopback', {'peer': peer})
    return name

  async def _serve(
    self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext
  ) -> None:
    peer, peer_host = _peer_text(writer.get_extra_info('peername'))
    if self._handshaking >= MAX_HANDSHAKES:
      self._failures.emit(
        peer_host, {'peer': peer, 'error': f'more than {MAX_HANDSHAKES} handshakes in progress'}
      )
      writer.transport.abort()
      return
    self._handshaking += 1
    try:
      await writer.start_tls(context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
    except (TimeoutError, OSError, EOFError) as e:  # ssl.SSLError is an OSError.
      self._failures.emit(peer_host, {'peer': peer, 'error': _handshake_error(e)})
      writer.transport.abort()
      return
    finally:
      self._handshaking -= 1
    caller = _common_name(writer.get_extra_info('peercert'))
    try:
      up_reader, up_writer = await asyncio.open_connection(
        '127.0.0.1', self._backend_port, limit=_CHUNK_BYTES
      )
    except OSError as e:
      self._logger.error(
        json.dumps(
          {
            'event': 'tls_front_backend_unreachable',
            'silo': self._silo_name,
            'peer': peer,
            'caller': caller,
            'error': e.strerror or str(e),
          }
        )
      )
      writer.transport.abort()
      return
    local_host, local_port = up_writer.get_extra_info('sockname')[:2]
    key = f'ipv4:{local_host}:{local_port}'
    with self._callers_lock:
      self._callers[key] = caller
    try:
      for w in (writer, up_writer):
        w.transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER_BYTES)
      await _relay((reader, up_writer), (up_reader, writer))
    finally:
      # Forget the connection before its socket closes: its local port can
      # then be reused only by a connection that is not in the map.
      with self._callers_lock:
        del self._callers[key]
      # close(), not abort(): what the pumps wrote last is still sent.
      up_writer.close()
      writer.close()

  def stop_accepting(self) -> None:
    """Closes the listening socket; relayed connections carry on."""
    if self._loop is not None and self._server is not None:
      self._loop.call_soon_threadsafe(self._server.close)

  def stop(self) -> None:
    """Closes the listener and every connection, logs suppressed counts, ends the thread."""
    loop, thread = self._loop, self._thread
    if loop is None or thread is None:
      return
    self._loop = self._thread = None
    try:
      asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=_STOP_TIMEOUT_S)
    except TimeoutError:
      pass  # Connections that did not end in time end with the loop.
    finally:
      self._end_loop(loop, thread)
      self._failures.flush()
      self._unidentified.flush()

  async def _close(self) -> None:
    if self._server is not None:
      self._server.close()
    tasks = [*self._connections, *([self._roller] if self._roller else [])]
    for task in tasks:
      task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

  @staticmethod
  def _end_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=_STOP_TIMEOUT_S)
    if not thread.is_alive():
      loop.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
  """Copies until EOF; True if it then half-closed `writer`, False if it cannot."""
  while True:
    data = await reader.read(_CHUNK_BYTES)
    if not data:
      break
    writer.write(data)
    await writer.drain()
  if writer.can_write_eof():
    writer.write_eof()
    return True
  return False


async def _relay(*directions: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
  """Runs both directions until both end, or one fails or ends without a half-close."""
  tasks = [asyncio.ensure_future(_pump(r, w)) for r, w in directions]
  try:
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    first = done.pop()
    if pending and first.exception() is None and first.result():
      await asyncio.wait(pending, timeout=_HALF_CLOSE_GRACE_S)
  finally:
    for task in tasks:
      task.cancel()
    # Connection errors end the relay; they are not the front's to report.
    await asyncio.gather(*tasks, return_exceptions=True)
