r"""Runs a silo server on a data owner's machine (`fedpipe-silo`).

    fedpipe-silo --data_dir=/srv/fedpipe/clients --listen=0.0.0.0:8443 \
        --tls_cert=certs/silo-a.pem --tls_key=certs/silo-a.key \
        --client_ca=certs/ca.pem \
        --policy=/etc/fedpipe/policy.toml --state_dir=/var/lib/fedpipe

`--data_dir` is the output of the preprocessing pipeline. `--raw_data` (a
glob of the owner's raw CSV/JSONL files, `--raw_format=csv|jsonl` or told
from the file names) lets the silo run approved statistics studies on them
(docs/federated_statistics.md); with `--raw_data` and no `--data_dir` the
silo runs in statistics-only mode, before any preprocessing. Coordinators must
present a client certificate signed by `--client_ca`, be named in the
policy's `allowed_callers`, and run only computations of studies the data
owner approved with `fedpipe-governance` (docs/governance.md). Without a
policy the silo refuses to start unless `--allow_ungoverned` says explicitly
that any authenticated caller may run anything (for tests and trials). Prints
`ready address=<host:port>` once serving; SIGTERM or Ctrl-C stops it
gracefully, ending its worker. See docs/deploy-silo.md.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Workers are started with fork+exec while gRPC channels are open.
os.environ.setdefault('GRPC_ENABLE_FORK_SUPPORT', 'false')

import functools
import json
import logging
import signal
import sys

from absl import app, flags

from fedpipe.data import manifest as manifest_lib
from fedpipe.errors import FedpipeError
from fedpipe.federation import certificates, silo_server
from fedpipe.federation import tls as tls_lib
from fedpipe.governance import gate as governance_gate
from fedpipe.governance import policy as silo_policy
from fedpipe.governance import store as governance_store

_DATA_DIR = flags.DEFINE_string(
  'data_dir', None, 'Preprocessed client-data directory (optional with --raw_data).'
)
_RAW_DATA = flags.DEFINE_string(
  'raw_data',
  None,
  'Glob of the raw CSV/JSONL files that approved statistics studies read (they never leave '
  'the silo; only noised statistics do).',
)
_RAW_FORMAT = flags.DEFINE_enum(
  'raw_format', None, ['csv', 'jsonl'], "--raw_data's record format; default: from file names."
)
_LISTEN = flags.DEFINE_string(
  'listen',
  '127.0.0.1:8443',
  'host:port to serve on; 0.0.0.0:8443 for every interface (port 0: any free port).',
)
_TLS_CERT = flags.DEFINE_string('tls_cert', None, "This silo's server certificate (PEM).")
_TLS_KEY = flags.DEFINE_string('tls_key', None, "This silo's private key (PEM).")
_CLIENT_CA = flags.DEFINE_string(
  'client_ca', None, 'CA certificate (PEM) that signs the coordinators allowed to connect.'
)
_NAME = flags.DEFINE_string('name', None, "Silo name; default: the certificate's common name.")
_WORKER_LOG = flags.DEFINE_string('worker_log', None, 'File for the TFF worker output.')
_MAX_CONCURRENT = flags.DEFINE_integer(
  'max_concurrent_computation_calls',
  -1,
  'Clients the TFF worker trains at once: < 0 = no '
  "limit (TFF's default; best for many small clients), 0 = two per CPU core this silo may "
  'use (faster for large clients), else the limit.',
)
_POLICY = flags.DEFINE_string(
  'policy', None, "The data owner's policy file (TOML; see docs/governance.md)."
)
_STATE_DIR = flags.DEFINE_string(
  'state_dir',
  None,
  'Directory of the governance database (studies, round ledger, audit '
  'log); keep it across restarts.',
)
_ALLOW_UNCONFINED_WORKER = flags.DEFINE_bool(
  'allow_unconfined_worker',
  False,
  'Where the kernel cannot confine the TFF worker to the '
  "client data (mount namespace, unprivileged user), run it with the host's filesystem "
  'instead of refusing to start: every approved computation could then read any file the '
  'silo can.',
)
_ALLOW_UNGOVERNED = flags.DEFINE_bool(
  'allow_ungoverned',
  False,
  'Run without a policy: every caller with a valid certificate '
  'may run any computation on this data. Only for tests and trials.',
)


class SiloFlagsError(FedpipeError, ValueError):
  """The silo's flags contradict each other or leave out what a governed silo needs."""


class _JsonLines(logging.Formatter):
  """Log records as JSON objects (messages that already are JSON are merged in)."""

  def format(self, record: logging.LogRecord) -> str:
    entry = {
      'time': round(record.created, 3),
      'level': record.levelname.lower(),
      'logger': record.name,
    }
    message = record.getMessage()
    try:
      fields = json.loads(message)
      entry.update(fields if isinstance(fields, dict) else {'message': message})
    except ValueError:
      entry['message'] = message
    return json.dumps(entry)


def _configure_logging() -> None:
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(_JsonLines())
  logger = logging.getLogger('fedpipe')
  logger.handlers[:] = [handler]
  logger.setLevel(logging.INFO)
  logger.propagate = False


def _governance(name: str):
  """The governance gate from --policy/--state_dir; None with --allow_ungoverned."""
  if not _DATA_DIR.value and not _RAW_DATA.value:
    raise SiloFlagsError(
      'give --data_dir (preprocessed client data, for training) and/or --raw_data (raw '
      'records, for statistics studies)'
    )
  if _ALLOW_UNGOVERNED.value:
    if _RAW_DATA.value:
      raise SiloFlagsError(
        '--raw_data needs --policy and --state_dir: statistics leave a silo only as approved, '
        'charged and audited studies'
      )
    if _POLICY.value or _STATE_DIR.value:
      raise SiloFlagsError(
        '--allow_ungoverned contradicts --policy/--state_dir; give one or the other'
      )
    logging.getLogger('fedpipe.silo').warning(
      json.dumps(
        {
          'event': 'ungoverned',
          'silo': name,
          'warning': 'no policy: any caller with a valid certificate may run any computation',
        }
      )
    )
    return None
  if not _POLICY.value or not _STATE_DIR.value:
    raise SiloFlagsError(
      '--policy and --state_dir are required: a silo runs only studies its owner approved '
      '(docs/governance.md). For a trial without governance pass --allow_ungoverned'
    )
  policy = silo_policy.load_policy(_POLICY.value)
  store = governance_store.GovernanceStore(_STATE_DIR.value)
  client_ids = []
  if _DATA_DIR.value:
    manifest = manifest_lib.read_manifest(_DATA_DIR.value)
    client_ids = [c for split in manifest.splits.values() for c in split.clients]
  return governance_gate.GovernanceGate(
    policy, store, client_ids=client_ids, silo_name=name, statistics=_statistics_source()
  )


def _statistics_source():
  """What computes a statistics query on --raw_data (checked to match files now); None without it."""
  if not _RAW_DATA.value:
    return None
  from fedpipe.pipelines import feature_statistics

  feature_statistics.resolve_raw_files(_RAW_DATA.value, _RAW_FORMAT.value)
  return functools.partial(
    feature_statistics.compute_silo_statistics,
    raw_data=_RAW_DATA.value,
    raw_format=_RAW_FORMAT.value,
  )


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  _configure_logging()
  tls = tls_lib.TlsFiles(ca=_CLIENT_CA.value, cert=_TLS_CERT.value, key=_TLS_KEY.value)
  name = _NAME.value
  if not name:
    try:
      with open(tls.cert, 'rb') as f:
        name = certificates.common_name(f.read())
    except (OSError, ValueError, IndexError) as e:
      print(f'error: cannot read --tls_cert {tls.cert!r}: {e}', file=sys.stderr)
      return 2
  try:
    gate = _governance(name)
  except FedpipeError as e:
    print(f'error: silo {name}: {e}', file=sys.stderr)
    return 2
  server = silo_server.SiloServer(
    data_dir=_DATA_DIR.value,
    listen=_LISTEN.value,
    tls=tls,
    silo_name=name,
    worker_log=_WORKER_LOG.value,
    gate=gate,
    max_concurrent_computation_calls=_MAX_CONCURRENT.value,
    allow_unconfined_worker=_ALLOW_UNCONFINED_WORKER.value,
  )
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: server.request_stop())
  try:
    server.start()
  except FedpipeError as e:
    print(f'error: silo {name}: {e}', file=sys.stderr)
    return 2
  print(f'ready address={server.address}', flush=True)
  try:
    server.wait()
  finally:
    server.stop()
  return 0


def run() -> None:
  """Console-script entrypoint."""
  flags.mark_flags_as_required(['tls_cert', 'tls_key', 'client_ca'])
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == '__main__':
  run()
