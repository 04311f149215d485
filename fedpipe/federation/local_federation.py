"""A federation on one machine: certificates and silo server processes on loopback.

For trying the cross-silo runtime, its tests and its benchmarks. Each silo is
a real `fedpipe-silo` process with its own data directory and certificate.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from fedpipe.federation import certificates
from fedpipe.federation import tls as tls_lib

_READY_TIMEOUT_S = 180.0


@dataclasses.dataclass(frozen=True)
class FederationCerts:
  """A CA, one server certificate per silo, and a coordinator certificate."""

  ca: certificates.IssuedFiles
  silos: dict[str, certificates.IssuedFiles]
  coordinator: certificates.IssuedFiles

  def silo_tls(self, name: str) -> tls_lib.TlsFiles:
    return tls_lib.TlsFiles(ca=self.ca.cert, cert=self.silos[name].cert, key=self.silos[name].key)

  def coordinator_tls(self) -> tls_lib.TlsFiles:
    return tls_lib.TlsFiles(ca=self.ca.cert, cert=self.coordinator.cert, key=self.coordinator.key)


def make_certs(
  out_dir: str, silo_names: Sequence[str], *, coordinator: str = 'coordinator'
) -> FederationCerts:
  """Creates a CA and certificates for silos reachable at 127.0.0.1/localhost."""
  ca = certificates.create_ca(out_dir)
  silos = {
    name: certificates.issue(
      ca, out_dir, common_name=name, kind='server', hosts=['127.0.0.1', 'localhost']
    )
    for name in silo_names
  }
  client = certificates.issue(ca, out_dir, common_name=coordinator, kind='client')
  return FederationCerts(ca=ca, silos=silos, coordinator=client)


DEMO_POLICY = """\
# A data owner's policy for trying fedpipe on one machine (docs/governance.md).
allowed_callers = ["coordinator"]

[privacy]
delta = 1e-5
max_epsilon = 8.0
max_lifetime_epsilon = 24.0
min_noise_multiplier = 0.8
max_clip_norm = 1.0
allow_adaptive_clipping = false

[training]
max_rounds = 500
min_clients_per_round = 10
max_clients_per_round = 1000
min_clients_per_aggregate = 3

[evaluation]
allow_unnoised_metrics = true
max_evaluations = 20

[statistics]
max_releases = 1
"""


def write_policy(path: str, text: str = DEMO_POLICY) -> str:
  """Writes a policy file (default: `DEMO_POLICY`); returns its path."""
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
  return path


class SiloProcess:
  """A `fedpipe-silo` subprocess; `address` is where it serves."""

  def __init__(self, process: subprocess.Popen, address: str, log_path: str):
    self.process = process
    self.address = address
    self.log_path = log_path

  @property
  def port(self) -> int:
    return int(self.address.rsplit(':', 1)[1])

  def kill(self) -> None:
    """SIGKILL: the silo dies at once (its worker follows it)."""
    if self.process.poll() is None:
      self.process.kill()
    self.process.wait()

  def stop(self, timeout: float = 30.0) -> int:
    """SIGTERM and wait: a graceful shutdown. Returns the exit status."""
    if self.process.poll() is None:
      self.process.send_signal(signal.SIGTERM)
      try:
        self.process.wait(timeout=timeout)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
    return self.process.returncode


def start_silo(
  *,
  data_dir: str | None,
  tls: tls_lib.TlsFiles,
  log_path: str,
  listen: str = '127.0.0.1:0',
  name: str | None = None,
  policy: str | None = None,
  state_dir: str | None = None,
  raw_data: str | None = None,
  raw_format: str | None = None,
  extra_args: Sequence[str] = (),
) -> SiloProcess:
  """Starts a silo server process and waits until it serves.

  With `policy` and `state_dir` the silo is governed; without them it runs
  with `--allow_ungoverned`. `raw_data` (a glob) and `raw_format` let it run
  statistics studies; without `data_dir` it runs for statistics only.

  Raises:
    RuntimeError: If it exits or does not become ready; the message holds the
      end of its log.
  """
  command = [
    sys.executable,
    '-m',
    'fedpipe.cli.silo',
    *([f'--data_dir={data_dir}'] if data_dir else []),
    *([f'--raw_data={raw_data}'] if raw_data else []),
    *([f'--raw_format={raw_format}'] if raw_format else []),
    f'--listen={listen}',
    f'--tls_cert={tls.cert}',
    f'--tls_key={tls.key}',
    f'--client_ca={tls.ca}',
    *([f'--name={name}'] if name else []),
    *(
      [f'--policy={policy}', f'--state_dir={state_dir}']
      if policy or state_dir
      else ['--allow_ungoverned']
    ),
    *extra_args,
  ]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
  log = open(log_path, 'ab')
  process = subprocess.Popen(
    command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env, text=True
  )
  log.close()
  deadline = time.monotonic() + _READY_TIMEOUT_S
  line = ''
  while time.monotonic() < deadline:
    line = process.stdout.readline()
    if line.startswith('ready address='):
      process.stdout.close()
      return SiloProcess(process, line.strip().split('=', 1)[1], log_path)
    if not line and process.poll() is not None:
      break
  process.kill()
  process.wait()
  with open(log_path, errors='replace') as f:
    tail = f.read()[-2000:]
  raise RuntimeError(f'silo on {data_dir or raw_data} did not start: {line!r}\n{tail}')


@dataclasses.dataclass
class LocalFederation:
  """Silo processes on loopback, their certificates, and where each keeps its state.

  A context manager: leaving the block stops every silo.
  """

  work_dir: str
  certs: FederationCerts
  silos: dict[str, SiloProcess]
  governed: bool

  @property
  def silos_flag(self) -> str:
    """The silos as the coordinator's `--silos` / `runtime.silos` takes them."""
    return ','.join(f'{name}={p.address}' for name, p in self.silos.items())

  def coordinator_tls(self) -> tls_lib.TlsFiles:
    return self.certs.coordinator_tls()

  def policy_path(self, name: str) -> str:
    return os.path.join(self.work_dir, f'{name}-policy.toml')

  def state_dir(self, name: str) -> str:
    return os.path.join(self.work_dir, f'{name}-state')

  def log_path(self, name: str) -> str:
    return os.path.join(self.work_dir, f'{name}.log')

  def stop(self) -> None:
    for process in self.silos.values():
      process.stop()

  def __enter__(self) -> LocalFederation:
    return self

  def __exit__(self, *exc_info) -> None:
    self.stop()


def start_local_federation(
  data_dirs: Mapping[str, str | None],
  work_dir: str,
  *,
  policy: str | None = DEMO_POLICY,
  extra_args: Sequence[str] = (),
  raw_data: Mapping[str, str] | None = None,
) -> LocalFederation:
  """Makes a CA and certificates, then starts one silo per data directory, all at once.

  Args:
    data_dirs: Silo name -> its preprocessed client-data directory, or None
      for a silo that serves statistics studies on raw data only.
    work_dir: Where certificates (`certs/`), policies, state and logs go. A
      second federation started on the same `work_dir` keeps the silos'
      state (their ledgers and audit logs).
    policy: The policy text every silo gets (governed silos, each with its
      own state directory); None starts them with `--allow_ungoverned`.
    extra_args: More `fedpipe-silo` flags for every silo.
    raw_data: Silo name -> a glob of its raw CSV/JSONL files, for
      statistics studies (`fedpipe-silo --raw_data`).

  Returns:
    The running `LocalFederation`.

  Raises:
    RuntimeError: If a silo does not start (the others are stopped); the
      message holds the end of its log.
  """
  os.makedirs(work_dir, exist_ok=True)
  certs = make_certs(os.path.join(work_dir, 'certs'), list(data_dirs))
  federation = LocalFederation(work_dir, certs, {}, governed=policy is not None)

  def start(name: str) -> SiloProcess:
    governance = {}
    if policy is not None:
      governance = dict(
        policy=write_policy(federation.policy_path(name), policy),
        state_dir=federation.state_dir(name),
      )
    return start_silo(
      data_dir=data_dirs[name],
      tls=certs.silo_tls(name),
      log_path=federation.log_path(name),
      extra_args=extra_args,
      raw_data=(raw_data or {}).get(name),
      **governance,
    )

  # Each silo spends seconds importing TensorFlow: start them side by side.
  with concurrent.futures.ThreadPoolExecutor(max_workers=len(data_dirs) or 1) as pool:
    futures = {name: pool.submit(start, name) for name in data_dirs}
  failures = []
  for name, future in futures.items():
    try:
      federation.silos[name] = future.result()
    except RuntimeError as e:
      failures.append(e)
  if failures:
    federation.stop()
    raise failures[0]
  return federation
