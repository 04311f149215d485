r"""Federated feature statistics across silos (`fedpipe-stats`).

    fedpipe-stats --feature_spec=draft_spec.json \
        --silos=hospital-a=a.example.org:8443,hospital-b=b.example.org:8443 \
        --tls_ca=certs/ca.pem --tls_cert=certs/coordinator.pem --tls_key=certs/coordinator.key \
        --max_rows_per_user=10 --histogram_bins=20 --noise_multiplier=2 \
        --output_dir=stats/

submits a statistics study (the draft spec's features, their bounds, the
bins, the contribution limits and the noise) to every silo, reports where it
stands at each (and waits up to `--wait_s` for the data owners' approval),
then has every silo compute its statistics on its raw data, noise them and
charge its privacy budget, and combines the noised releases into

* `<output_dir>/feature_spec.json`: the draft spec with the federation's
  means/stds and vocabularies (the shared feature spec every silo
  preprocesses with);
* `<output_dir>/statistics_report.json`: every released statistic with its
  noise standard deviation, the combined statistics with standard errors,
  and clipping bounds from histogram quantiles;
* `<output_dir>/plots/<feature>.png`: one plot per feature.

`--submit_only` submits and prints `study_id=<id>`. Exit status 3 when a silo
has not approved the study (nothing was released). See
docs/federated_statistics.md.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('GRPC_ENABLE_FORK_SUPPORT', 'false')

import sys

from absl import app, flags

from fedpipe.errors import FedpipeError
from fedpipe.federation import cross_silo, statistics_study
from fedpipe.federation import tls as tls_lib
from fedpipe.pipelines import feature_spec as feature_spec_lib
from fedpipe.pipelines import federated_statistics
from fedpipe.runtime import execution_context

execution_context.refuse_unisolated_default_context()

SHARED_SPEC_FILENAME = federated_statistics.SHARED_SPEC_FILENAME
EXIT_NOT_APPROVED = 3

_FEATURE_SPEC = flags.DEFINE_string(
  'feature_spec', None, 'The draft feature spec (JSON): which features, their bounds.'
)
_SILOS = flags.DEFINE_string('silos', None, 'The silos: [name=]host:port,...')
_TLS_CA = flags.DEFINE_string('tls_ca', None, 'CA certificate that signed the silos (PEM).')
_TLS_CERT = flags.DEFINE_string('tls_cert', None, "This coordinator's client certificate (PEM).")
_TLS_KEY = flags.DEFINE_string('tls_key', None, "This coordinator's private key (PEM).")
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Where the shared spec and report go.')
_NAME = flags.DEFINE_string('name', None, "The study's name; default: from the spec's file name.")
_MAX_ROWS = flags.DEFINE_integer('max_rows_per_user', 10, 'Rows one user contributes at most.')
_BINS = flags.DEFINE_integer('histogram_bins', 20, 'Histogram bins of every numeric feature.')
_NOISE = flags.DEFINE_float(
  'noise_multiplier', 1.0, 'Noise std / L2 sensitivity of the whole release (0: test mode).'
)
_THRESHOLD_DELTA = flags.DEFINE_float(
  'threshold_delta',
  None,
  'Delta spent releasing categorical values (default 1e-7 with categorical features, else 0).',
)
_RELEASES = flags.DEFINE_integer('releases', 1, 'Releases to ask each silo to approve.')
_CLIP_QUANTILES = flags.DEFINE_list(
  'clip_quantiles', ['0.01', '0.99'], 'Histogram quantiles reported as clipping bounds.'
)
_WAIT_S = flags.DEFINE_float('wait_s', 0.0, "Seconds to wait for every silo's approval.")
_TIMEOUT_S = flags.DEFINE_float('timeout_s', 900.0, 'The most one silo call may take.')
_SUBMIT_ONLY = flags.DEFINE_bool('submit_only', False, 'Submit the study, print its id, exit.')


class StatsFlagsError(FedpipeError, ValueError):
  """A flag of fedpipe-stats is missing or out of range."""


def _print_line(line: str) -> None:
  print(line, flush=True)


def _settings() -> federated_statistics.StatisticsSettings:
  try:
    quantiles = tuple(float(q) for q in _CLIP_QUANTILES.value)
  except ValueError:
    quantiles = ()
  if len(quantiles) != 2:
    raise StatsFlagsError(f'--clip_quantiles must be two numbers, got {_CLIP_QUANTILES.value}')
  return federated_statistics.StatisticsSettings(
    max_rows_per_user=_MAX_ROWS.value,
    histogram_bins=_BINS.value,
    noise_multiplier=_NOISE.value,
    threshold_delta=_THRESHOLD_DELTA.value,
    releases=_RELEASES.value,
    clip_quantiles=quantiles,
  )


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    for flag in (_FEATURE_SPEC, _SILOS, _TLS_CA, _TLS_CERT, _TLS_KEY):
      if not flag.value:
        raise StatsFlagsError(f'--{flag.name} is required')
    if not _SUBMIT_ONLY.value and not _OUTPUT_DIR.value:
      raise StatsFlagsError('--output_dir is required (where the shared spec and report go)')
    settings = _settings()
    draft = feature_spec_lib.FeatureSpec.load(_FEATURE_SPEC.value)
    name = _NAME.value or f'feature statistics of {os.path.basename(_FEATURE_SPEC.value)}'
    silos = cross_silo.parse_silos(_SILOS.value)
    tls = tls_lib.TlsFiles(ca=_TLS_CA.value, cert=_TLS_CERT.value, key=_TLS_KEY.value)
    if _SUBMIT_ONLY.value:
      federated_statistics.submit(
        draft, silos, tls, settings, name=name, timeout_s=_TIMEOUT_S.value, progress=_print_line
      )
      return 0
    result = federated_statistics.compute_shared_spec(
      draft,
      silos,
      tls,
      settings,
      _OUTPUT_DIR.value,
      name=name,
      wait_s=_WAIT_S.value,
      timeout_s=_TIMEOUT_S.value,
      progress=_print_line,
    )
  except statistics_study.StatisticsStudyNotReadyError as e:
    print(str(e), file=sys.stderr)
    return EXIT_NOT_APPROVED
  except FedpipeError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for line in federated_statistics.summary_lines(result):
    print(line)
  return 0


def run() -> None:
  """Console-script entrypoint."""
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == '__main__':
  run()
