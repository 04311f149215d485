r"""Trains a federated model, with user-level DP, on preprocessed client data.

    fedpipe-train --config=configs/digits_dp.py \
        [--config.training.rounds=50] [--output_dir=runs/digits_dp] [--overwrite]

Each round prints one line (round, clients, loss, accuracy, ε so far,
seconds). Rerunning the same command after an interruption resumes from the
last checkpoint. At the end it evaluates on the held-out clients, exports the
Keras model, writes the privacy report and a plot, and prints

    test_accuracy=<float>
    epsilon=<float>
    delta=<float>
    output_dir=<path>

One run at a time uses an output directory: a second one is refused at once.

Exit status: 0 on success; 2 with one line `error: ...` on stderr for a
problem the user can fix (a flag, the config, the data, the output directory,
a failed round); 130 on Ctrl-C and 143 on SIGTERM, after one line saying
after which round training stopped.
"""

from __future__ import annotations

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Workers are started with fork+exec while gRPC channels are open.
os.environ.setdefault('GRPC_ENABLE_FORK_SUPPORT', 'false')

import sys
from typing import TYPE_CHECKING

from absl import app, flags

from fedpipe.cli import entrypoint as cli
from fedpipe.errors import FedpipeError
from fedpipe.runtime import shutdown
from fedpipe.training import run_directory

if TYPE_CHECKING:
  import ml_collections

  from fedpipe.training import loop as training_loop

# TensorFlow Federated takes seconds to import: this program loads it only once
# the flags and the config have passed (`_parse_flags`), so a mistyped flag or
# config field is reported at once.

_CONFIG = cli.define_config_flag()
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Run directory; default runs/<config.name>.')
_SILOS = flags.DEFINE_string(
  'silos', None, 'Train across these silos: [name=]host:port,... (sets runtime.mode=silos).'
)
_TLS_CA = flags.DEFINE_string('tls_ca', None, 'CA certificate that signed the silos (PEM).')
_TLS_CERT = flags.DEFINE_string('tls_cert', None, "This coordinator's client certificate (PEM).")
_TLS_KEY = flags.DEFINE_string('tls_key', None, "This coordinator's private key (PEM).")
_SUBMIT_STUDY = flags.DEFINE_bool(
  'submit_study',
  False,
  "Only submit this run's study to the silos for approval, print "
  "each silo's answer and the study id, and exit (docs/governance.md).",
)
_OVERWRITE = flags.DEFINE_bool(
  'overwrite', False, 'Discard a previous run in --output_dir instead of resuming it.'
)


def _apply_runtime_flags(config) -> None:
  runtime = config.runtime
  if _SILOS.value:
    runtime.silos = _SILOS.value
    runtime.mode = 'silos'
  for flag, field in ((_TLS_CA, 'tls_ca'), (_TLS_CERT, 'tls_cert'), (_TLS_KEY, 'tls_key')):
    if flag.value:
      runtime[field] = flag.value


class _PrintRounds:
  """The progress callback: prints one line per round and remembers the last round."""

  def __init__(self) -> None:
    self.last_round = 0

  def __call__(self, progress: training_loop.RoundProgress) -> None:
    from fedpipe.training import loop  # Loaded already: training is running.

    self.last_round = progress.round
    print(loop.format_progress(progress), flush=True)


def _parse_flags(argv: list[str]) -> tuple[list[str], ml_collections.ConfigDict]:
  """Parses the flags and checks the config, then loads TensorFlow Federated.

  The import happens here, before `app.run` calls `main`: TensorFlow 2.14
  imported from inside an absl `main` gives Keras graph tensors instead of
  Keras tensors, and building a functional model fails ('SymbolicTensor'
  object has no attribute 'node').

  Returns:
    What `main` gets: the arguments absl did not consume, and the config.
  """
  remaining = cli.parse_flags(argv, known_only=False)
  config = cli.load_config(_CONFIG)
  from fedpipe.runtime import execution_context
  from fedpipe.training import program

  # Importing TFF made it a default context holding a local worker manager, whose
  # __del__ fails at interpreter exit if nothing replaced it (an early error).
  execution_context.refuse_unisolated_default_context()
  program.quiet_logs()
  program.print_messages()
  return remaining, config


def _interruption_message(rounds: _PrintRounds, output_dir: str | None, *, submitting: bool) -> str:
  if submitting:
    return 'interrupted; rerun the same command to submit the study'
  # What a rerun resumes from is what the run directory holds; a round saved
  # just before the interruption may not have been printed yet.
  saved = (
    run_directory.RunDirectory(os.path.abspath(output_dir)).last_checkpoint() if output_dir else 0
  )
  done = max(rounds.last_round, saved)
  if not done:
    return 'interrupted before the first round; rerun the same command to resume'
  if saved == done:
    return f'interrupted after round {done}; rerun the same command to resume'
  if not saved:
    return (
      f'interrupted after round {done}, before its first checkpoint; rerun the same '
      'command to start again'
    )
  return (
    f'interrupted after round {done}; rerun the same command to resume from the '
    f'checkpoint of round {saved}'
  )


def main(parsed: tuple[list[str], ml_collections.ConfigDict]) -> int:
  from fedpipe.training import federated_training
  from fedpipe.training import program as training_program

  argv, config = parsed
  if len(argv) > 1:
    cli.fail(f'unexpected argument(s) {" ".join(argv[1:])}; this program takes flags only.')
  rounds = _PrintRounds()
  output_dir = None
  try:
    with shutdown.graceful_termination():
      _apply_runtime_flags(config)
      output_dir = _OUTPUT_DIR.value or os.path.join('runs', config.name)
      if _SUBMIT_STUDY.value:
        with run_directory.lock(output_dir):
          study_id = training_program.submit_study(config, output_dir)
        print(f'study_id={study_id}', flush=True)
      else:
        result = federated_training.train(
          None,
          None,
          config=config,
          output_dir=output_dir,
          progress=rounds,
          overwrite=_OVERWRITE.value,
        )
        print(result.summary(), flush=True)
  except FedpipeError as e:
    cli.fail(str(e))
  except (KeyboardInterrupt, shutdown.Terminated) as e:
    message = _interruption_message(rounds, output_dir, submitting=_SUBMIT_STUDY.value)
    print(message, file=sys.stderr, flush=True)
    return shutdown.interruption_exit_code(e)
  return 0


def run() -> None:
  """Console-script entrypoint."""
  app.run(
    lambda parsed: sys.exit(main(parsed)),
    flags_parser=_parse_flags,
  )


if __name__ == '__main__':
  run()
