"""Connect to silos over mutual TLS and list what each holds: references and counts, never records.

The first thing a data scientist does with a federation, before training:

    with connect('hospital-a=10.0.0.5:8443,hospital-b=10.0.0.6:8443', tls) as fed:
      for dataset in fed.datasets():
        print(dataset.silo, dataset.num_clients('train'), dataset.num_examples('train'))

`connect` opens one mutual-TLS channel per silo (`cross_silo.SiloConnection`)
and asks each for its manifest (`fedpipe.Silo/GetManifest`): client ids,
example counts per split and the feature spec, the way a PySyft Datasite
hands out dataset references. It starts no TFF worker and runs no
computation; the coordinator's own worker starts only when training does.

This module imports no TensorFlow: `cross_silo` (which imports TensorFlow
Federated) is imported when `connect` runs.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedpipe.data import manifest as manifest_lib
from fedpipe.errors import FedpipeError
from fedpipe.federation import certificates
from fedpipe.federation import tls as tls_lib
from fedpipe.runtime import rpc_errors

if TYPE_CHECKING:
  from fedpipe.federation import cross_silo

DEFAULT_TIMEOUT_S = 30.0
# After waiting for a silo timed out, one more call of this length asks gRPC
# why it could not connect (refused, TLS handshake failed, ...).
_PROBE_TIMEOUT_S = 2.0


class SiloFederationClosedError(FedpipeError, RuntimeError):
  """A `SiloFederation` was used after `close()`."""


@dataclasses.dataclass(frozen=True)
class SiloDataset:
  """What one silo holds, as its manifest says: client ids and counts, never records.

  Attributes:
    silo: The silo's name in the federation (the `name` of `name=host:port`,
      or the name the silo reports).
    address: Its `host:port`.
    splits: Split (`'train'`, `'eval'`) -> client id -> number of examples.
      Clients the silo excluded (too few examples) are not listed.
    num_features: Width of each example's `x`.
    num_classes: Number of label classes (2 for the label task 'binary', 0
      for 'regression').
    feature_spec: The feature spec the silo's data was preprocessed with
      (silos of one federation must share it to train together).
  """

  silo: str
  address: str
  splits: Mapping[str, Mapping[str, int]]
  num_features: int
  num_classes: int
  feature_spec: Mapping[str, Any]
  # The label task of the records (`fedpipe.data.record_schema.LABEL_TASKS`).
  label_task: str = 'multiclass'

  @classmethod
  def from_manifest(cls, silo: str, address: str, manifest: manifest_lib.Manifest) -> SiloDataset:
    """The dataset reference of a silo's manifest.

    Args:
      silo: The silo's name in the federation.
      address: Its `host:port`.
      manifest: The manifest it served.

    Returns:
      The reference: ids and counts per split, record shape and feature spec.

    Example:

      >>> SiloDataset.from_manifest('silo-a', '127.0.0.1:8443', manifest).client_ids()
      ['user0', 'user1']
    """
    return cls(
      silo=silo,
      address=address,
      splits={
        name: dict(sorted(split.clients.items())) for name, split in sorted(manifest.splits.items())
      },
      num_features=manifest.num_features,
      num_classes=manifest.num_classes,
      feature_spec=copy.deepcopy(dict(manifest.feature_spec)),
      label_task=manifest.label_task,
    )

  def _split(self, split: str) -> Mapping[str, int]:
    if split not in self.splits:
      raise manifest_lib.ManifestError(
        f'silo {self.silo} has no {split!r} split (it has {sorted(self.splits)}); its data '
        f'owner preprocesses that split to provide it.'
      )
    return self.splits[split]

  def client_ids(self, split: str = manifest_lib.TRAIN_SPLIT) -> list[str]:
    """The silo's client ids in `split`, sorted.

    Args:
      split: `'train'` or `'eval'`.

    Returns:
      The ids as the silo names them; training across silos names them
      `<silo>/<client id>`.

    Raises:
      fedpipe.data.manifest.ManifestError: If the silo has no such split.

    Example:

      >>> dataset.client_ids('eval')[:2]
      ['user0', 'user3']
    """
    return list(self._split(split))

  def num_clients(self, split: str = manifest_lib.TRAIN_SPLIT) -> int:
    """The number of clients in `split` (raises ManifestError if the silo has none).

    Example:

      >>> dataset.num_clients('train')
      10
    """
    return len(self._split(split))

  def num_examples(self, split: str = manifest_lib.TRAIN_SPLIT) -> int:
    """The number of examples of all clients in `split` (raises ManifestError if none).

    Example:

      >>> dataset.num_examples('train')
      598
    """
    return sum(self._split(split).values())


class SiloFederation:
  """Open mutual-TLS connections to silos; a context manager. Made by `connect`.

  Attributes:
    tls: The coordinator's TLS files the connections use.
  """

  def __init__(
    self,
    connections: Mapping[str, cross_silo.SiloConnection],
    tls: tls_lib.TlsFiles,
    *,
    timeout_s: float,
  ):
    self._connections = dict(connections)
    self.tls = tls
    self._timeout_s = timeout_s
    self._closed = False

  @property
  def silos(self) -> list[str]:
    """The silo names, in the order given to `connect`."""
    return list(self._connections)

  @property
  def silos_spec(self) -> str:
    """The silos as `name=host:port,...`: the value of `config.runtime.silos` or `--silos`.

    Example:

      >>> fed.silos_spec
      'hospital-a=10.0.0.5:8443,hospital-b=10.0.0.6:8443'
    """
    return ','.join(
      c.address if c.name == c.address else f'{c.name}={c.address}'
      for c in self._connections.values()
    )

  def datasets(self) -> list[SiloDataset]:
    """Asks every silo for its manifest now; one `SiloDataset` per silo, in `silos` order.

    Returns:
      References and counts, never records.

    Raises:
      SiloFederationClosedError: If the federation was closed.
      fedpipe.federation.cross_silo.SiloUnavailableError: If a silo stopped
        answering or refuses us now; the message names it.

    Example:

      >>> {d.silo: d.num_examples('train') for d in fed.datasets()}
      {'hospital-a': 598, 'hospital-b': 601}
    """
    if self._closed:
      raise SiloFederationClosedError(
        f'this SiloFederation ({self.silos_spec}) is closed; connect again with '
        'fedpipe.connect(...).'
      )
    fetched = _fetch_all(list(self._connections.values()), self.tls, self._timeout_s)
    return [
      SiloDataset.from_manifest(name, connection.address, manifest)
      for (name, connection), (_, manifest) in zip(self._connections.items(), fetched)
    ]

  def close(self) -> None:
    """Closes every connection; calling it again does nothing.

    Example:

      >>> fed.close()
    """
    if self._closed:
      return
    self._closed = True
    for connection in self._connections.values():
      connection.close()

  def __enter__(self) -> SiloFederation:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()

  def __repr__(self) -> str:
    state = 'closed' if self._closed else 'open'
    return f'SiloFederation({self.silos_spec!r}, {state})'


def connect(
  silos: str | Mapping[str, str],
  tls: tls_lib.TlsFiles | tuple[str, str, str],
  *,
  timeout_s: float = DEFAULT_TIMEOUT_S,
) -> SiloFederation:
  """Connects to silos over mutual TLS and checks that each answers us.

  Each silo is asked for its manifest (all at once, each waiting up to
  `timeout_s` for the silo to come up); no TFF worker is started.

  Args:
    silos: `'[name=]host:port,...'` (the `--silos` flag and
      `config.runtime.silos`; an unnamed silo goes by the name it reports),
      or a mapping name -> `'host:port'`.
    tls: The coordinator's certificate and key and the CA that signed the
      silos' certificates: a `TlsFiles`, or a `(ca, cert, key)` tuple of PEM
      file paths.
    timeout_s: How long to wait for each silo.

  Returns:
    The connected federation; close it (or use it as a context manager).

  Raises:
    fedpipe.federation.cross_silo.SiloUnavailableError: If a silo cannot be
      reached in time or refuses us (for instance our certificate is not
      signed by the CA it trusts, or its policy does not allow our
      certificate's name); the message names the silo and the reason.
    fedpipe.federation.cross_silo.FederationError: If `silos` is malformed or
      two silos have the same name.
    fedpipe.federation.tls.TlsConfigError: If a TLS file is missing or not PEM.

  Example:

    >>> from fedpipe import connect
    >>> with connect('hospital-a=10.0.0.5:8443,hospital-b=10.0.0.6:8443',
    ...              ('certs/ca.pem', 'certs/coordinator.pem', 'certs/coordinator.key')) as fed:
    ...   print([(d.silo, d.num_clients()) for d in fed.datasets()])
    [('hospital-a', 120), ('hospital-b', 80)]
  """
  from fedpipe.federation import cross_silo  # Imports TensorFlow Federated.

  addresses = _silo_addresses(silos)
  tls = _tls_files(tls)
  if not isinstance(timeout_s, int | float) or isinstance(timeout_s, bool) or timeout_s <= 0:
    raise cross_silo.FederationError(f'timeout_s must be a positive number, got {timeout_s!r}.')
  tls.channel_credentials()  # Reads and checks the files once, before any connection.
  connections: list[cross_silo.SiloConnection] = []
  try:
    for address in addresses:
      connections.append(cross_silo.SiloConnection(address, tls))
    reported = _fetch_all(connections, tls, timeout_s)
    named: dict[str, cross_silo.SiloConnection] = {}
    for address, connection, (own_name, _) in zip(addresses, connections, reported):
      if address.name is None and _is_silo_name(own_name):
        connection.name = own_name
      if connection.name in named:
        raise cross_silo.FederationError(
          f'two silos are named {connection.name!r} ({named[connection.name].address} and '
          f'{connection.address}); name them with name=host:port.'
        )
      named[connection.name] = connection
  except BaseException:
    for connection in connections:
      connection.close()
    raise
  return SiloFederation(named, tls, timeout_s=float(timeout_s))


def _is_silo_name(name: str) -> bool:
  """Whether `name` may name a silo in `--silos` (what `cross_silo.parse_silos` accepts)."""
  from fedpipe.federation import cross_silo

  if not name or any(c in name for c in ',= '):
    return False
  try:
    return [a.name for a in cross_silo.parse_silos(f'{name}=host:1')] == [name]
  except cross_silo.FederationError:
    return False


def _silo_addresses(silos: Any) -> list[cross_silo.SiloAddress]:
  from fedpipe.federation import cross_silo

  if isinstance(silos, str):
    addresses = cross_silo.parse_silos(silos)
    names = [a.name for a in addresses if a.name is not None]
    for name in names:
      if names.count(name) > 1:
        raise cross_silo.FederationError(
          f'silos={silos!r} names two silos {name!r}; give each silo its own name.'
        )
    return addresses
  if not isinstance(silos, Mapping):
    raise cross_silo.FederationError(
      f"silos must be a '[name=]host:port,...' string or a mapping name -> 'host:port', got "
      f'{type(silos).__name__}.'
    )
  addresses = []
  for name, address in silos.items():
    parsed = []
    if isinstance(name, str) and isinstance(address, str):
      try:
        parsed = cross_silo.parse_silos(f'{name}={address}')
      except cross_silo.FederationError:
        pass  # Said below, naming the mapping's entry.
    if len(parsed) != 1 or parsed[0].name != name:
      raise cross_silo.FederationError(
        f'silo {name!r}: {address!r} is not a silo name and host:port (e.g. '
        "{'hospital-a': '10.0.0.5:8443'}); names are letters, digits and _.:-"
      )
    addresses.append(parsed[0])
  if not addresses:
    raise cross_silo.FederationError('no silos given: the mapping of silos is empty.')
  return addresses


def _tls_files(tls: Any) -> tls_lib.TlsFiles:
  if isinstance(tls, tls_lib.TlsFiles):
    return tls
  if (
    isinstance(tls, Sequence)
    and not isinstance(tls, str)
    and len(tls) == 3
    and all(isinstance(p, str | os.PathLike) for p in tls)
  ):
    ca, cert, key = (os.fspath(p) for p in tls)
    return tls_lib.TlsFiles(ca=ca, cert=cert, key=key)
  raise tls_lib.TlsConfigError(
    f'tls must be a fedpipe.TlsFiles or a (ca, cert, key) tuple of PEM file paths, got {tls!r}.'
  )


def _fetch_all(
  connections: Sequence[cross_silo.SiloConnection],
  tls: tls_lib.TlsFiles,
  timeout_s: float,
) -> list[tuple[str, manifest_lib.Manifest]]:
  """Fetches every silo's manifest in parallel.

  Returns:
    (the name the silo reports, its manifest) per connection, in order.

  Raises:
    SiloUnavailableError: Naming every silo that failed, with each reason.
  """
  from fedpipe.federation import cross_silo

  def fetch(connection: cross_silo.SiloConnection) -> tuple[str, manifest_lib.Manifest]:
    try:
      return connection.fetch_manifest(timeout_s)
    except cross_silo.SiloUnavailableError as e:
      raise _explained(connection, e, tls, timeout_s) from e.__cause__

  results: list[tuple[str, manifest_lib.Manifest]] = []
  failures: list[cross_silo.SiloUnavailableError] = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(connections), 32)) as pool:
    for future in [pool.submit(fetch, c) for c in connections]:
      try:
        results.append(future.result())
      except cross_silo.SiloUnavailableError as e:
        failures.append(e)
  if len(failures) == 1:
    raise failures[0]
  if failures:
    raise cross_silo.SiloUnavailableError(
      ','.join(e.silo for e in failures),
      f'{len(failures)} silos are unavailable: ' + ' | '.join(str(e) for e in failures),
    ) from failures[0]
  return results


def _explained(
  connection: cross_silo.SiloConnection,
  error: cross_silo.SiloUnavailableError,
  tls: tls_lib.TlsFiles,
  timeout_s: float,
) -> cross_silo.SiloUnavailableError:
  """`error` with what went wrong said plainly: a refusal, or why the connection failed."""
  import grpc
  from grpc_health.v1 import health_pb2, health_pb2_grpc

  from fedpipe.federation import cross_silo

  cause = rpc_errors.find_rpc_error(error)
  code = cause.code() if cause is not None else None
  where = f'silo {connection.name} at {connection.address}'
  if code == grpc.StatusCode.PERMISSION_DENIED:
    return cross_silo.SiloUnavailableError(
      connection.name,
      f'{where} refused us: {rpc_errors.details_line(cause.details())}. Our certificate '
      f"{_describe_cert(tls.cert)} is signed by a CA the silo trusts, but the silo's policy "
      "does not allow its name: ask the silo's data owner to add it to allowed_callers, or "
      'connect with a certificate the policy allows.',
    )
  if code == grpc.StatusCode.DEADLINE_EXCEEDED:
    # Waiting hid gRPC's reason, and a channel in reconnect backoff may no longer
    # tell it: a health check on a new channel, that does not wait, makes one
    # fresh attempt and reports how it failed.
    try:
      with grpc.secure_channel(connection.address, tls.channel_credentials()) as channel:
        health_pb2_grpc.HealthStub(channel).Check(
          health_pb2.HealthCheckRequest(service=''), timeout=_PROBE_TIMEOUT_S
        )
      reason = 'it answered a health check after the wait'
    except grpc.RpcError as probe:
      reason = rpc_errors.rpc_summary(probe)
    tls_advice = (
      f'our certificate {_describe_cert(tls.cert)} is not signed by the CA the silo trusts '
      "(its --client_ca), or the silo's certificate is not signed by our CA "
      f'{tls.ca!r} or does not name the host we dial'
    )
    lowered = reason.lower()
    if 'connection refused' in lowered:
      advice = 'nothing listens there: check that the silo runs and that host:port is right.'
    elif any(
      w in lowered for w in ('socket closed', 'connection reset', 'handshake', 'ssl', 'certificate')
    ):
      # The silo's TLS front closes (or resets) a connection whose handshake fails.
      advice = (
        'the silo ended the connection before answering, as it does when the TLS handshake '
        f'fails: {tls_advice}.'
      )
    else:
      advice = (
        'check that the silo runs and that its address is right and reachable; if it is, '
        f'{tls_advice}.'
      )
    return cross_silo.SiloUnavailableError(
      connection.name,
      f'{where} did not answer within timeout_s={timeout_s:g}s (last attempt: {reason}); ' + advice,
    )
  return error


def _describe_cert(path: str) -> str:
  """`'path' (name 'cn')`, or just the path if it cannot be read."""
  try:
    with open(path, 'rb') as f:
      return f'{path!r} (name {certificates.common_name(f.read())!r})'
  except (OSError, ValueError, IndexError):
    return repr(path)
