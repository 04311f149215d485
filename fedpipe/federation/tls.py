"""Mutual TLS from PEM files (gRPC credentials, a server `ssl.SSLContext`) and
the caller's identity, with errors that name the file."""

from __future__ import annotations

import dataclasses
import ssl
from typing import Protocol

import grpc

from fedpipe.errors import FedpipeError


class TlsConfigError(FedpipeError, ValueError):
  """A TLS file is missing, unreadable or not PEM."""


def _read(path: str, what: str) -> bytes:
  if not path:
    raise TlsConfigError(f'no {what} given')
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise TlsConfigError(f'cannot read the {what} {path!r}: {e.strerror}') from e
  if b'-----BEGIN' not in data:
    raise TlsConfigError(f'the {what} {path!r} is not a PEM file')
  return data


@dataclasses.dataclass(frozen=True)
class TlsFiles:
  """A holder's certificate and key, and the CA it trusts for its peers."""

  ca: str
  cert: str
  key: str

  def server_ssl_context(self) -> ssl.SSLContext:
    """Server side for a Python TLS endpoint (TLS >= 1.2, ALPN h2, as gRPC needs).

    Presents `cert` and requires a client certificate signed by `ca`.

    Raises:
      TlsConfigError: If a file is missing, not PEM, or the key does not
        belong to the certificate.
    """
    ca = _read(self.ca, 'client CA certificate').decode('ascii', errors='replace')
    _read(self.cert, 'TLS certificate')
    _read(self.key, 'TLS key')
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(['h2'])
    try:
      context.load_verify_locations(cadata=ca)
    except ssl.SSLError as e:
      raise TlsConfigError(
        f'the client CA certificate {self.ca!r} is not a valid certificate: {e.reason}'
      ) from e
    try:
      context.load_cert_chain(self.cert, self.key)
    except ssl.SSLError as e:
      raise TlsConfigError(
        f'the TLS certificate {self.cert!r} and key {self.key!r} are not a valid matching '
        f'pair ({e.reason or e}); give the key the certificate was issued for'
      ) from e
    return context

  def channel_credentials(self) -> grpc.ChannelCredentials:
    """Client side: verify the server against `ca`, and present `cert`."""
    return grpc.ssl_channel_credentials(
      root_certificates=_read(self.ca, 'CA certificate'),
      private_key=_read(self.key, 'TLS key'),
      certificate_chain=_read(self.cert, 'TLS certificate'),
    )


class CallerDirectory(Protocol):
  """Knows the certificate behind connections a TLS front relays (see tls_front)."""

  def caller_of(self, peer: str) -> str | None:
    """The common name for a gRPC `context.peer()`; None if not relayed."""


def peer_identity(
  context: grpc.ServicerContext, directory: CallerDirectory | None = None
) -> str | None:
  """The common name of the caller's verified client certificate.

  Args:
    context: The call's gRPC context.
    directory: For a server behind a TLS front (which verified the
      certificate), the front; None when gRPC itself terminates TLS.

  Returns:
    The common name, '' for a verified certificate without one, or None if
    the connection has no verified client certificate.
  """
  if directory is not None:
    return directory.caller_of(context.peer())
  auth = context.auth_context()
  names = auth.get('x509_common_name', [])
  if names:
    return names[0].decode()
  return '' if auth.get('x509_pem_cert') else None


def authenticated_caller(
  context: grpc.ServicerContext, directory: CallerDirectory | None = None, *, server: str
) -> str:
  """`peer_identity`, or the call ends with UNAUTHENTICATED if there is none.

  Args:
    context: The call's gRPC context.
    directory: As for `peer_identity`.
    server: How the refusal names this server (e.g. "silo hospital-a").

  Returns:
    The common name of the caller's verified client certificate.
  """
  name = peer_identity(context, directory)
  if name is None:
    context.abort(
      grpc.StatusCode.UNAUTHENTICATED,
      f'{server}: this connection has no verified client certificate; connect '
      "with mutual TLS to the server's public address",
    )
  return name
