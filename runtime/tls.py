"""gRPC credentials for mutual TLS, from PEM files, with errors that name the file."""

from __future__ import annotations

import dataclasses

import grpc


class TlsConfigError(ValueError):
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

  def server_credentials(self) -> grpc.ServerCredentials:
    """Server side: present `cert`, and require a client certificate signed by `ca`."""
    return grpc.ssl_server_credentials(
        [(_read(self.key, 'TLS key'), _read(self.cert, 'TLS certificate'))],
        root_certificates=_read(self.ca, 'client CA certificate'),
        require_client_auth=True,
    )

  def channel_credentials(self) -> grpc.ChannelCredentials:
    """Client side: verify the server against `ca`, and present `cert`."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(self.ca, 'CA certificate'),
        private_key=_read(self.key, 'TLS key'),
        certificate_chain=_read(self.cert, 'TLS certificate'),
    )


def peer_identity(context: grpc.ServicerContext) -> str:
  """The common name of the caller's verified client certificate ('' if none)."""
  names = context.auth_context().get('x509_common_name', [])
  return names[0].decode() if names else ''
