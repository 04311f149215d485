"""The silo's TLS front: failed handshakes logged with the peer, rate-limited;
connections that bypass it have no identity. Real silo processes on loopback."""

import json
import os
import pathlib
import re
import socket
import ssl

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_federated.proto.v0 import executor_pb2, executor_pb2_grpc

from fedpipe.federation import local_federation, silo_protocol, tls_front
from fedpipe.federation import tls as tls_lib
from tests.conftest import log_events, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def federation(tmp_path_factory, digits_client_data):
  """One ungoverned silo, `silo-a`, on the session's digits data."""
  root = tmp_path_factory.mktemp('tls_front')
  with local_federation.start_local_federation(
    {'silo-a': digits_client_data.processed}, str(root), policy=None
  ) as running:
    yield running


@pytest.fixture(scope='module')
def env(federation, rogue_coordinator, digits_client_data):
  """The silo's data, the federation's certificates, and a rogue CA's client certificate."""
  return {
    'root': pathlib.Path(federation.work_dir),
    'data': digits_client_data.processed,
    'certs': federation.certs,
    'rogue': rogue_coordinator,
  }


def _start(env, log_name, **kwargs):
  return local_federation.start_silo(
    data_dir=env['data'],
    tls=env['certs'].silo_tls('silo-a'),
    log_path=str(env['root'] / log_name),
    **kwargs,
  )


@pytest.fixture(scope='module')
def silo(federation):
  """The federation's silo (the federation stops it)."""
  return federation.silos['silo-a']


def _wait_for(predicate, timeout=10.0):
  return wait_until(predicate, timeout, interval=0.1)


def _failed_handshake(env, port, cert=None):
  """A TLS client (with `cert`, or none) that the silo refuses; returns its `host:port`."""
  context = ssl.create_default_context(cafile=env['certs'].ca.cert)
  context.set_alpn_protocols(['h2'])
  if cert is not None:
    context.load_cert_chain(cert.cert, cert.key)
  with socket.create_connection(('127.0.0.1', port), timeout=10) as raw:
    host, local_port = raw.getsockname()
    try:
      with context.wrap_socket(raw, server_hostname='127.0.0.1') as tls:
        # TLS 1.3 clients finish first; the refusal comes on the first read.
        assert tls.recv(1) == b''
    except (ssl.SSLError, ConnectionResetError):
      pass
  return f'{host}:{local_port}'


def _grpc_channel(env, address, cert=None):
  with open(env['certs'].ca.cert, 'rb') as f:
    root = f.read()
  chain = key = None
  if cert is not None:
    with open(cert.cert, 'rb') as f:
      chain = f.read()
    with open(cert.key, 'rb') as f:
      key = f.read()
  return grpc.secure_channel(address, grpc.ssl_channel_credentials(root, key, chain))


def _get_manifest(channel):
  return channel.unary_unary(silo_protocol.method_path(silo_protocol.GET_MANIFEST))(b'', timeout=10)


def test_failed_handshakes_are_logged_with_the_peer_address(env, silo):
  no_cert = _failed_handshake(env, silo.port)
  wrong_ca = _failed_handshake(env, silo.port, cert=env['rogue'])
  for cert in (None, env['rogue']):
    with _grpc_channel(env, silo.address, cert) as channel:
      with pytest.raises(grpc.RpcError) as error:
        _get_manifest(channel)
      assert error.value.code() == grpc.StatusCode.UNAVAILABLE

  def by_peer():
    return {e['peer']: e for e in log_events(silo.log_path, 'tls_handshake_failed')}

  assert _wait_for(lambda: {no_cert, wrong_ca} <= set(by_peer()))
  events = by_peer()
  assert events[no_cert]['silo'] == 'silo-a'
  assert events[no_cert]['error'] == 'PEER_DID_NOT_RETURN_A_CERTIFICATE'
  assert events[wrong_ca]['error'].startswith('CERTIFICATE_VERIFY_FAILED')
  # The gRPC clients' handshakes too, with their addresses.
  assert _wait_for(lambda: len(by_peer()) >= 4)
  assert all(re.fullmatch(r'127\.0\.0\.1:\d+', peer) for peer in by_peer())


def test_a_flood_of_failed_handshakes_logs_at_most_the_rate_limit(env):
  flooded = _start(env, 'flooded.log')
  try:
    for _ in range(50):
      _failed_handshake(env, flooded.port)
  finally:
    assert flooded.stop() == 0  # Stopping logs the suppressed count.
  failed = log_events(flooded.log_path, 'tls_handshake_failed')
  suppressed = log_events(flooded.log_path, 'tls_handshake_failures_suppressed')
  assert len(failed) == tls_front.FAILURES_PER_PEER
  assert sum(e['suppressed'] for e in suppressed) == 50 - tls_front.FAILURES_PER_PEER
  assert {p for e in suppressed for p in e['peers']} == {'127.0.0.1'}


def _internal_address(silo):
  (serving,) = log_events(silo.log_path, 'serving')
  assert serving['address'] == silo.address
  return serving['internal_address']


def _assert_unauthenticated(call):
  with pytest.raises(grpc.RpcError) as error:
    call()
  assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED, error.value
  assert 'no verified client certificate' in error.value.details()


@pytest.mark.parametrize('governed', [False, True], ids=['ungoverned', 'governed'])
def test_connections_that_bypass_the_tls_front_are_unauthenticated(env, silo, governed):
  target = silo
  if governed:
    policy = local_federation.write_policy(str(env['root'] / 'policy.toml'))
    target = _start(env, 'governed.log', policy=policy, state_dir=str(env['root'] / 'state'))
  try:
    internal = _internal_address(target)
    assert internal.startswith('127.0.0.1:') and internal != target.address
    with grpc.insecure_channel(internal) as bypass:
      _assert_unauthenticated(lambda: _get_manifest(bypass))
      _assert_unauthenticated(
        lambda: executor_pb2_grpc.ExecutorGroupStub(bypass).GetExecutor(
          executor_pb2.GetExecutorRequest(), timeout=10
        )
      )
      _assert_unauthenticated(
        lambda: health_pb2_grpc.HealthStub(bypass).Check(
          health_pb2.HealthCheckRequest(service=''), timeout=10
        )
      )
      if governed:
        _assert_unauthenticated(
          lambda: bypass.unary_unary(silo_protocol.method_path(silo_protocol.STUDY_STATUS))(
            b'{}', timeout=10
          )
        )
    assert log_events(target.log_path, 'unauthenticated_connection')
    # Through the front, the caller is its certificate's name.
    with _grpc_channel(env, target.address, env['certs'].coordinator) as good:
      assert json.loads(_get_manifest(good))['silo'] == 'silo-a'
      assert health_pb2_grpc.HealthStub(good).Check(
        health_pb2.HealthCheckRequest(service=''), timeout=10
      ).status == (health_pb2.HealthCheckResponse.SERVING)
    assert _wait_for(
      lambda: any(
        e.get('caller') == 'coordinator' for e in log_events(target.log_path, 'GetManifest')
      )
    )
  finally:
    if governed:
      target.stop()


def test_start_errors_name_the_address_or_the_files(env, tmp_path):
  with socket.socket() as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    port = taken.getsockname()[1]
    with pytest.raises(
      RuntimeError,
      match=rf'cannot listen on 127\.0\.0\.1:{port}: '
      'Address already in use',
    ):
      _start(env, 'in-use.log', listen=f'127.0.0.1:{port}')
  certs = env['certs']
  wrong_key = tls_lib.TlsFiles(
    ca=certs.ca.cert, cert=certs.silos['silo-a'].cert, key=certs.coordinator.key
  )
  with pytest.raises(RuntimeError, match='are not a valid matching pair'):
    local_federation.start_silo(
      data_dir=env['data'], tls=wrong_key, log_path=str(tmp_path / 'wrong-key.log')
    )
  assert os.path.exists(tmp_path / 'wrong-key.log')
