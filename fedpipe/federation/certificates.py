"""Certificates for mutual TLS between a coordinator and its silos (`cryptography`).

One certificate authority per federation signs every silo's server
certificate and every coordinator's client certificate. A silo trusts
callers whose client certificate its configured CA signed; the coordinator
trusts silos whose server certificate that CA signed for the silo's address.
A certificate's common name is the holder's identity (silo policies name
coordinators by it).
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpipe.data import atomic_files
from fedpipe.errors import FedpipeError

_VALIDITY = datetime.timedelta(days=365)


class CertificateError(FedpipeError, ValueError):
  """A certificate or key file is missing, unreadable or of the wrong kind."""


@dataclasses.dataclass(frozen=True)
class IssuedFiles:
  """Paths of a certificate and its private key (PEM)."""

  cert: str
  key: str


def _write(path: str, data: bytes, mode: int) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  atomic_files.write_bytes(path, data, mode=mode, durable=True)


def _write_key(path: str, key: ec.EllipticCurvePrivateKey) -> None:
  _write(
    path,
    key.private_bytes(
      serialization.Encoding.PEM,
      serialization.PrivateFormat.PKCS8,
      serialization.NoEncryption(),
    ),
    0o600,
  )


def _write_cert(path: str, cert: x509.Certificate) -> None:
  _write(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _name(common_name: str, organization: str) -> x509.Name:
  return x509.Name(
    [
      x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
      x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ]
  )


def create_ca(
  out_dir: str, *, name: str = 'fedpipe federation CA', organization: str = 'fedpipe'
) -> IssuedFiles:
  """Creates a CA certificate and key: `<out_dir>/ca.pem`, `ca.key` (0600)."""
  key = ec.generate_private_key(ec.SECP256R1())
  now = datetime.datetime.now(datetime.UTC)
  subject = _name(name, organization)
  cert = (
    x509.CertificateBuilder()
    .subject_name(subject)
    .issuer_name(subject)
    .public_key(key.public_key())
    .serial_number(x509.random_serial_number())
    .not_valid_before(now - datetime.timedelta(minutes=5))
    .not_valid_after(now + 10 * _VALIDITY)
    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    .add_extension(
      x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
      ),
      critical=True,
    )
    .sign(key, hashes.SHA256())
  )
  files = IssuedFiles(os.path.join(out_dir, 'ca.pem'), os.path.join(out_dir, 'ca.key'))
  _write_key(files.key, key)
  _write_cert(files.cert, cert)
  return files


def _load_ca(ca: IssuedFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
  try:
    with open(ca.cert, 'rb') as f:
      cert = x509.load_pem_x509_certificate(f.read())
    with open(ca.key, 'rb') as f:
      key = serialization.load_pem_private_key(f.read(), password=None)
  except (OSError, ValueError) as e:
    raise CertificateError(f'cannot load the CA ({ca.cert}, {ca.key}): {e}') from e
  return cert, key


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
  names: list[x509.GeneralName] = []
  for host in hosts:
    try:
      names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
      names.append(x509.DNSName(host))
  return x509.SubjectAlternativeName(names)


def issue(
  ca: IssuedFiles,
  out_dir: str,
  *,
  common_name: str,
  kind: str,
  hosts: Sequence[str] = (),
  organization: str = 'fedpipe',
  file_stem: str | None = None,
) -> IssuedFiles:
  """Issues a certificate signed by `ca`.

  Args:
    ca: The CA's certificate and key.
    out_dir: Where `<stem>.pem` and `<stem>.key` (0600) go.
    common_name: The holder's identity (a silo's or coordinator's name).
    kind: 'server' (a silo: needs `hosts`) or 'client' (a coordinator).
    hosts: DNS names or IP addresses a server is reached at.
    organization: The subject's organization.
    file_stem: File name stem; default `common_name`.

  Returns:
    The written files.

  Raises:
    CertificateError: For an unknown kind, a server without hosts, or an
      unreadable CA.
  """
  if kind not in ('server', 'client'):
    raise CertificateError(f"kind must be 'server' or 'client', got {kind!r}")
  if kind == 'server' and not hosts:
    raise CertificateError('a server certificate needs the host names or IPs it is reached at')
  ca_cert, ca_key = _load_ca(ca)
  key = ec.generate_private_key(ec.SECP256R1())
  now = datetime.datetime.now(datetime.UTC)
  usage = ExtendedKeyUsageOID.SERVER_AUTH if kind == 'server' else ExtendedKeyUsageOID.CLIENT_AUTH
  builder = (
    x509.CertificateBuilder()
    .subject_name(_name(common_name, organization))
    .issuer_name(ca_cert.subject)
    .public_key(key.public_key())
    .serial_number(x509.random_serial_number())
    .not_valid_before(now - datetime.timedelta(minutes=5))
    .not_valid_after(now + _VALIDITY)
    .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
  )
  if hosts:
    builder = builder.add_extension(_san(hosts), critical=False)
  cert = builder.sign(ca_key, hashes.SHA256())
  stem = file_stem or common_name
  files = IssuedFiles(os.path.join(out_dir, f'{stem}.pem'), os.path.join(out_dir, f'{stem}.key'))
  _write_key(files.key, key)
  _write_cert(files.cert, cert)
  return files


def common_name(cert_pem: bytes) -> str:
  """The subject common name of a PEM certificate."""
  cert = x509.load_pem_x509_certificate(cert_pem)
  return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
