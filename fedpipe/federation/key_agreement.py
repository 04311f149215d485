"""Authenticated pairwise key agreement for one secure-aggregation round.

Every silo of a round makes a fresh X25519 key, signs a bundle (protocol
version, study id, round, attempt, silo name, computation fingerprint, public
key) with the key of its mutual-TLS server certificate, and the coordinator
relays the bundles. Before using any peer key, a silo checks each bundle
against what it knows, never what the coordinator says:

* the certificate was issued by the federation's CA, is valid now, is a
  server (silo) certificate, and its common name is the bundle's silo name;
* the signature over the bundle verifies with that certificate's key;
* the bundle is for this study, round, attempt and computation (a bundle
  replayed from another round or study fails here) and its silo is on the
  study's roster, once.

The silos then sign a digest of the whole roster of bundles and check every
peer's signature on the same digest before any masked vector leaves: a
coordinator that shows different silos different keys (or different rosters)
is caught before anything is released.

Pairwise seeds come from X25519 shared secrets through HKDF-SHA256 (salt:
the protocol version, study, round and attempt; info: the two silo names),
and masks from ChaCha20 keystreams of those seeds: each pair's masks cancel
in the sum modulo 2^64 and look uniform to anyone without the seed.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography import exceptions as crypto_exceptions
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpipe.errors import FedpipeError

PROTOCOL_VERSION = 'fedpipe-secagg-1'
_SEED_BYTES = 32


class SecureAggregationError(FedpipeError, RuntimeError):
  """A secure-aggregation round cannot go on; `silo` names the silo at fault, if one is."""

  def __init__(self, message: str, *, silo: str | None = None):
    super().__init__(message)
    self.silo = silo


class PeerVerificationError(SecureAggregationError):
  """A peer's key bundle or roster confirmation does not verify."""


@dataclasses.dataclass(frozen=True)
class RoundContext:
  """What one round's keys are bound to: a bundle for anything else is refused."""

  study_id: str
  round: int
  attempt: int
  fingerprint: str

  def salt(self) -> bytes:
    return _canonical(
      {
        'version': PROTOCOL_VERSION,
        'study_id': self.study_id,
        'round': self.round,
        'attempt': self.attempt,
      }
    )


@dataclasses.dataclass(frozen=True)
class KeyBundle:
  """A silo's signed public key for one round."""

  silo: str
  study_id: str
  round: int
  attempt: int
  fingerprint: str
  public_key: bytes
  certificate: bytes
  signature: bytes

  def signed_bytes(self) -> bytes:
    """What the signature covers (canonical JSON: one byte string per bundle)."""
    return _canonical(
      {
        'version': PROTOCOL_VERSION,
        'kind': 'key_bundle',
        'silo': self.silo,
        'study_id': self.study_id,
        'round': self.round,
        'attempt': self.attempt,
        'fingerprint': self.fingerprint,
        'public_key': self.public_key.hex(),
      }
    )

  def to_json(self) -> dict[str, object]:
    return {
      'silo': self.silo,
      'study_id': self.study_id,
      'round': self.round,
      'attempt': self.attempt,
      'fingerprint': self.fingerprint,
      'public_key': self.public_key.hex(),
      'certificate': self.certificate.decode('ascii'),
      'signature': self.signature.hex(),
    }

  @classmethod
  def from_json(cls, data: Mapping[str, object]) -> KeyBundle:
    """Parses a relayed bundle.

    Raises:
      PeerVerificationError: If a field is missing or malformed (named).
    """
    silo = str(data.get('silo', '?'))
    try:
      return cls(
        silo=_field(data, 'silo', str),
        study_id=_field(data, 'study_id', str),
        round=_field(data, 'round', int),
        attempt=_field(data, 'attempt', int),
        fingerprint=_field(data, 'fingerprint', str),
        public_key=bytes.fromhex(_field(data, 'public_key', str)),
        certificate=_field(data, 'certificate', str).encode('ascii'),
        signature=bytes.fromhex(_field(data, 'signature', str)),
      )
    except (ValueError, UnicodeEncodeError) as e:
      raise PeerVerificationError(
        f'key bundle of silo {silo!r} is malformed: {e}', silo=silo
      ) from e


def _field(data: Mapping[str, object], name: str, kind: type):
  value = data.get(name)
  if not isinstance(value, kind) or isinstance(value, bool):
    raise ValueError(f'field {name!r} must be a {kind.__name__}, got {type(value).__name__}')
  return value


def _canonical(data: Mapping[str, object]) -> bytes:
  return json.dumps(data, sort_keys=True, separators=(',', ':')).encode('utf-8')


def _load_signing_key(key_pem: bytes) -> ec.EllipticCurvePrivateKey:
  key = serialization.load_pem_private_key(key_pem, password=None)
  if not isinstance(key, ec.EllipticCurvePrivateKey):
    raise SecureAggregationError('the silo TLS key must be an elliptic-curve key to sign bundles')
  return key


def _sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
  return key.sign(data, ec.ECDSA(hashes.SHA256()))


class RoundKeys:
  """One silo's secret key for one round, and its signed public bundle.

  A fresh X25519 key is made for every (study, round, attempt); it lives only
  in this object and is never written anywhere.
  """

  def __init__(self, *, silo: str, context: RoundContext, tls_cert_pem: bytes, tls_key_pem: bytes):
    self.silo = silo
    self.context = context
    self._signing_key = _load_signing_key(tls_key_pem)
    self._certificate = tls_cert_pem
    self._secret = x25519.X25519PrivateKey.generate()
    public = self._secret.public_key().public_bytes(
      serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    unsigned = KeyBundle(
      silo=silo,
      study_id=context.study_id,
      round=context.round,
      attempt=context.attempt,
      fingerprint=context.fingerprint,
      public_key=public,
      certificate=tls_cert_pem,
      signature=b'',
    )
    self.bundle = dataclasses.replace(
      unsigned, signature=_sign(self._signing_key, unsigned.signed_bytes())
    )

  def pairwise_seeds(self, peers: Sequence[KeyBundle]) -> dict[str, bytes]:
    """A 32-byte seed shared with each peer (the peers' bundles, verified first)."""
    seeds = {}
    for peer in peers:
      if peer.silo == self.silo:
        continue
      try:
        shared = self._secret.exchange(x25519.X25519PublicKey.from_public_bytes(peer.public_key))
      except ValueError as e:
        raise PeerVerificationError(
          f'silo {peer.silo} sent an unusable X25519 public key: {e}', silo=peer.silo
        ) from e
      pair = '|'.join(sorted((self.silo, peer.silo)))
      seeds[peer.silo] = HKDF(
        algorithm=hashes.SHA256(),
        length=_SEED_BYTES,
        salt=self.context.salt(),
        info=f'{PROTOCOL_VERSION}|mask|{pair}'.encode(),
      ).derive(shared)
    return seeds

  def sign_roster(self, digest: bytes) -> bytes:
    """This silo's signature on the roster digest it saw."""
    return _sign(self._signing_key, _roster_message(self.context, digest))


def _roster_message(context: RoundContext, digest: bytes) -> bytes:
  return _canonical(
    {
      'version': PROTOCOL_VERSION,
      'kind': 'roster',
      'study_id': context.study_id,
      'round': context.round,
      'attempt': context.attempt,
      'digest': digest.hex(),
    }
  )


def _common_name(cert: x509.Certificate) -> str | None:
  names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
  return str(names[0].value) if names else None


def verified_silo_certificate(
  cert_pem: bytes, *, silo: str, ca_cert_pem: bytes, now: datetime.datetime | None = None
) -> x509.Certificate:
  """The certificate of silo `silo`, checked against the federation's CA.

  Raises:
    PeerVerificationError: If it is not a currently valid silo (server)
      certificate issued by the CA to the common name `silo`.
  """
  try:
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca = x509.load_pem_x509_certificate(ca_cert_pem)
  except ValueError as e:
    raise PeerVerificationError(f'silo {silo}: unreadable certificate: {e}', silo=silo) from e
  try:
    cert.verify_directly_issued_by(ca)
  except (ValueError, TypeError, crypto_exceptions.InvalidSignature) as e:
    raise PeerVerificationError(
      f'silo {silo}: its certificate was not issued by the federation CA', silo=silo
    ) from e
  now = now or datetime.datetime.now(datetime.UTC)
  if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
    raise PeerVerificationError(f'silo {silo}: its certificate is not valid now', silo=silo)
  try:
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
  except x509.ExtensionNotFound:
    usages = []
  if ExtendedKeyUsageOID.SERVER_AUTH not in usages:
    raise PeerVerificationError(
      f'silo {silo}: the certificate is not a silo (server) certificate', silo=silo
    )
  if _common_name(cert) != silo:
    raise PeerVerificationError(
      f'silo {silo}: the certificate belongs to {_common_name(cert)!r}, not {silo!r}', silo=silo
    )
  return cert


def verify_bundles(
  bundles: Sequence[KeyBundle],
  *,
  context: RoundContext,
  roster: Sequence[str],
  ca_cert_pem: bytes,
) -> list[KeyBundle]:
  """Checks every relayed bundle (see the module docstring); returns them by silo name.

  Raises:
    PeerVerificationError: Naming the first silo whose bundle fails, or the
      roster member without one.
  """
  expected = set(roster)
  seen: dict[str, KeyBundle] = {}
  for bundle in bundles:
    silo = bundle.silo
    if silo not in expected:
      raise PeerVerificationError(
        f'a key bundle names silo {silo!r}, which is not on the roster {sorted(expected)}',
        silo=silo,
      )
    if silo in seen:
      raise PeerVerificationError(f'silo {silo}: two key bundles in one round', silo=silo)
    got = (bundle.study_id, bundle.round, bundle.attempt, bundle.fingerprint)
    want = (context.study_id, context.round, context.attempt, context.fingerprint)
    if got != want:
      raise PeerVerificationError(
        f'silo {silo}: its key bundle is for study {bundle.study_id} round {bundle.round} '
        f'attempt {bundle.attempt}, not study {context.study_id} round {context.round} '
        f'attempt {context.attempt} (replayed or substituted)',
        silo=silo,
      )
    if len(bundle.public_key) != 32:
      raise PeerVerificationError(f'silo {silo}: its public key is not 32 bytes', silo=silo)
    cert = verified_silo_certificate(bundle.certificate, silo=silo, ca_cert_pem=ca_cert_pem)
    try:
      cert.public_key().verify(bundle.signature, bundle.signed_bytes(), ec.ECDSA(hashes.SHA256()))
    except (crypto_exceptions.InvalidSignature, TypeError, AttributeError) as e:
      raise PeerVerificationError(
        f'silo {silo}: the signature on its key bundle does not verify (missing, forged, '
        'or the key was substituted)',
        silo=silo,
      ) from e
    seen[silo] = bundle
  missing = sorted(expected - set(seen))
  if missing:
    raise PeerVerificationError(
      f'no key bundle from silo {missing[0]} (roster: {sorted(expected)})', silo=missing[0]
    )
  return [seen[name] for name in sorted(seen)]


def roster_digest(bundles: Sequence[KeyBundle]) -> bytes:
  """SHA-256 over the verified bundles of a round, in silo-name order."""
  rows = [b.signed_bytes().decode() for b in sorted(bundles, key=lambda b: b.silo)]
  return hashlib.sha256(_canonical({'bundles': rows})).digest()


def verify_roster_confirmations(
  confirmations: Mapping[str, bytes],
  *,
  bundles: Sequence[KeyBundle],
  context: RoundContext,
  digest: bytes,
) -> None:
  """Checks that every silo of the roster signed the same `digest` this silo computed.

  `bundles` are the verified bundles: each silo's signature is checked with
  the certificate its own bundle carried.

  Raises:
    PeerVerificationError: Naming a silo whose confirmation is missing or
      does not verify (it saw a different roster, or the coordinator forged it).
  """
  message = _roster_message(context, digest)
  for bundle in bundles:
    signature = confirmations.get(bundle.silo)
    if not signature:
      raise PeerVerificationError(
        f'silo {bundle.silo}: no roster confirmation; nothing is released', silo=bundle.silo
      )
    cert = x509.load_pem_x509_certificate(bundle.certificate)
    try:
      cert.public_key().verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except crypto_exceptions.InvalidSignature as e:
      raise PeerVerificationError(
        f'silo {bundle.silo}: its roster confirmation does not match the roster this silo '
        'saw (the coordinator showed silos different keys); nothing is released',
        silo=bundle.silo,
      ) from e


def mask_words(seed: bytes, count: int) -> np.ndarray:
  """`count` uint64 words of the ChaCha20 keystream of `seed` (a fresh key per round and pair)."""
  if len(seed) != _SEED_BYTES:
    raise SecureAggregationError(f'a mask seed must be {_SEED_BYTES} bytes, got {len(seed)}')
  encryptor = Cipher(algorithms.ChaCha20(seed, b'\0' * 16), mode=None).encryptor()
  return np.frombuffer(encryptor.update(b'\0' * (8 * count)), dtype='<u8').astype(np.uint64)


def mask_vector(silo: str, seeds: Mapping[str, bytes], count: int) -> np.ndarray:
  """The sum of `silo`'s pairwise masks: + toward later names, - toward earlier (mod 2^64).

  Over all silos of a round the masks cancel exactly.
  """
  total = np.zeros(count, dtype=np.uint64)
  for peer in sorted(seeds):
    words = mask_words(seeds[peer], count)
    if peer > silo:
      total += words
    else:
      total -= words
  return total
