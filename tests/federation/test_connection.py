"""connect(): mutual-TLS connections to real silo processes, and what each silo holds."""

import concurrent.futures
import dataclasses
import socket

import numpy as np
import pytest

from fedpipe.data import manifest as manifest_lib
from fedpipe.data.client_data_writer import write_client_data
from fedpipe.errors import FedpipeError
from fedpipe.federation import certificates, cross_silo, local_federation
from fedpipe.federation import tls as tls_lib
from fedpipe.federation.connection import (
  SiloDataset,
  SiloFederation,
  SiloFederationClosedError,
  connect,
)
from fedpipe.runtime import isolated_worker

NUM_FEATURES = 4
NUM_CLASSES = 3
# silo-a: governed (only 'coordinator' allowed), train and eval; silo-b: ungoverned, train only.
TRAIN = {'silo-a': {'u1': 5, 'u2': 3, 'u3': 7}, 'silo-b': {'p1': 4, 'p2': 2}}
EVAL = {'silo-a': {'u1': 2, 'u4': 3}}


def _arrays(sizes, seed):
  rng = np.random.default_rng(seed)
  return {
    client_id: (rng.normal(size=(n, NUM_FEATURES)), rng.integers(0, NUM_CLASSES, size=n))
    for client_id, n in sizes.items()
  }


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def env(tmp_path_factory, rogue_coordinator):
  """Client data written by write_client_data, certificates (ours, a stranger's signed by the
  silos' CA, and one from another CA) and a policy."""
  root = tmp_path_factory.mktemp('connection')
  for seed, (silo, sizes) in enumerate(TRAIN.items()):
    eval_ = _arrays(EVAL[silo], seed + 10) if silo in EVAL else None
    write_client_data(root / silo, _arrays(sizes, seed), eval_, num_classes=NUM_CLASSES)
  certs = local_federation.make_certs(str(root / 'certs'), list(TRAIN))
  stranger = certificates.issue(
    certs.ca, str(root / 'certs'), common_name='stranger', kind='client'
  )
  rogue = rogue_coordinator
  return {
    'root': root,
    'certs': certs,
    'stranger': tls_lib.TlsFiles(ca=certs.ca.cert, cert=stranger.cert, key=stranger.key),
    'rogue': tls_lib.TlsFiles(ca=certs.ca.cert, cert=rogue.cert, key=rogue.key),
    'policy': local_federation.write_policy(str(root / 'policy.toml')),
  }


@pytest.fixture(scope='module')
def silos(env):
  """The two silo processes, started side by side.

  Not `local_federation.start_local_federation`: it governs all its silos or none.
  """
  root = env['root']

  def start(name):
    governed = name == 'silo-a'
    return local_federation.start_silo(
      data_dir=str(root / name),
      tls=env['certs'].silo_tls(name),
      log_path=str(root / f'{name}.log'),
      policy=env['policy'] if governed else None,
      state_dir=str(root / f'{name}-state') if governed else None,
    )

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = {name: pool.submit(start, name) for name in TRAIN}
  started = {}
  try:
    for name, future in futures.items():
      started[name] = future.result()
    yield started
  finally:
    for silo in started.values():
      silo.stop()


@pytest.fixture
def no_worker(monkeypatch):
  """connect() must start no TFF worker: constructing one fails the test."""

  def refuse(*args, **kwargs):
    raise AssertionError('connect() started a TFF worker')

  monkeypatch.setattr(isolated_worker, 'IsolatedWorker', refuse)


@pytest.mark.slow
def test_connect_lists_each_silos_clients_and_counts(env, silos, no_worker):
  spec = ','.join(s.address for s in silos.values())  # Unnamed: silos go by their own names.
  tls = env['certs'].coordinator_tls()
  with connect(spec, tls, timeout_s=20) as fed:
    assert isinstance(fed, SiloFederation)
    assert fed.silos == ['silo-a', 'silo-b']
    assert fed.silos_spec == f'silo-a={silos["silo-a"].address},silo-b={silos["silo-b"].address}'
    assert cross_silo.parse_silos(fed.silos_spec)[1].address == silos['silo-b'].address
    assert fed.tls == tls
    a, b = fed.datasets()
  assert a == SiloDataset(
    silo='silo-a',
    address=silos['silo-a'].address,
    splits={'eval': EVAL['silo-a'], 'train': TRAIN['silo-a']},
    num_features=NUM_FEATURES,
    num_classes=NUM_CLASSES,
    feature_spec=manifest_lib.read_manifest(str(env['root'] / 'silo-a')).feature_spec,
  )
  assert a.client_ids() == ['u1', 'u2', 'u3']
  assert a.client_ids('eval') == ['u1', 'u4']
  assert (a.num_clients(), a.num_examples(), a.num_examples('eval')) == (3, 15, 5)
  assert b.silo == 'silo-b' and b.address == silos['silo-b'].address
  assert dict(b.splits) == {'train': TRAIN['silo-b']}
  with pytest.raises(manifest_lib.ManifestError, match="silo silo-b has no 'eval' split"):
    b.client_ids('eval')
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.silo = 'other'
  assert a.label_task == 'multiclass'
  # References and counts only: every field is a name, a number or the spec.
  assert set(dataclasses.asdict(a)) == {
    'silo',
    'address',
    'splits',
    'num_features',
    'num_classes',
    'feature_spec',
    'label_task',
  }
  fed.close()  # Again: nothing happens.
  with pytest.raises(SiloFederationClosedError, match='is closed'):
    fed.datasets()


@pytest.mark.slow
def test_a_mapping_and_a_tls_tuple_name_the_silos(env, silos, no_worker):
  certs = env['certs']
  with connect(
    {'hospital': silos['silo-b'].address},
    (certs.ca.cert, certs.coordinator.cert, certs.coordinator.key),
    timeout_s=20,
  ) as fed:
    assert fed.silos_spec == f'hospital={silos["silo-b"].address}'
    assert isinstance(fed.tls, tls_lib.TlsFiles)
    (dataset,) = fed.datasets()
  assert dataset.silo == 'hospital'
  assert dataset.client_ids() == ['p1', 'p2']


@pytest.mark.slow
def test_a_caller_the_silos_policy_does_not_allow_is_told_so(env, silos):
  with pytest.raises(cross_silo.SiloUnavailableError) as error:
    connect(f'silo-a={silos["silo-a"].address}', env['stranger'], timeout_s=20)
  assert error.value.silo == 'silo-a'
  message = str(error.value)
  assert "caller 'stranger' is not allowed by this silo's policy" in message
  assert "(name 'stranger')" in message and 'allowed_callers' in message
  assert isinstance(error.value, FedpipeError)


@pytest.mark.slow
def test_a_certificate_from_another_ca_is_named_as_the_likely_cause(env, silos):
  with pytest.raises(cross_silo.SiloUnavailableError) as error:
    connect({'silo-b': silos['silo-b'].address}, env['rogue'], timeout_s=2)
  assert error.value.silo == 'silo-b'
  message = str(error.value)
  assert 'did not answer within timeout_s=2s' in message
  assert 'TLS handshake' in message and env['rogue'].cert in message


@pytest.mark.slow
def test_an_unreachable_silo_is_named_and_nothing_stays_open(env, silos):
  spec = f'silo-a={silos["silo-a"].address},gone=127.0.0.1:{_free_port()}'
  with pytest.raises(cross_silo.SiloUnavailableError) as error:
    connect(spec, env['certs'].coordinator_tls(), timeout_s=2)
  assert error.value.silo == 'gone'
  assert 'silo gone at 127.0.0.1:' in str(error.value)
  assert 'nothing listens there' in str(error.value)


def test_a_silo_that_is_not_running_is_named(tmp_path):
  certs = local_federation.make_certs(str(tmp_path), ['x'])
  with pytest.raises(cross_silo.SiloUnavailableError) as error:
    connect(f'nobody=127.0.0.1:{_free_port()}', certs.coordinator_tls(), timeout_s=0.5)
  assert error.value.silo == 'nobody'
  assert 'silo nobody' in str(error.value)


@pytest.mark.parametrize(
  'silos, error, message',
  [
    ('hospital-a', cross_silo.FederationError, r'is not \[name=\]host:port'),
    ('', cross_silo.FederationError, 'no silos given'),
    ('a=h:1,a=h:2', cross_silo.FederationError, "names two silos 'a'"),
    ({'a b': 'h:1'}, cross_silo.FederationError, r"silo 'a b': 'h:1' is not a silo name"),
    ({'a': 'h'}, cross_silo.FederationError, r"silo 'a': 'h' is not"),
    ({}, cross_silo.FederationError, 'mapping of silos is empty'),
    (['h:1'], cross_silo.FederationError, 'got list'),
  ],
)
def test_malformed_silos_are_refused_before_connecting(tmp_path, silos, error, message):
  certs = local_federation.make_certs(str(tmp_path), ['x'])
  with pytest.raises(error, match=message):
    connect(silos, certs.coordinator_tls())


def test_unusable_tls_files_are_refused_naming_the_file(tmp_path):
  certs = local_federation.make_certs(str(tmp_path), ['x'])
  with pytest.raises(tls_lib.TlsConfigError, match=r'\(ca, cert, key\) tuple'):
    connect('a=127.0.0.1:1', (certs.ca.cert, certs.coordinator.cert))
  missing = str(tmp_path / 'missing.key')
  with pytest.raises(tls_lib.TlsConfigError, match='missing.key'):
    connect('a=127.0.0.1:1', (certs.ca.cert, certs.coordinator.cert, missing))
