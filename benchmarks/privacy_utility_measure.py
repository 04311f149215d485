"""One point of the privacy-utility curve: train the digits demo at a noise level.

    python -m benchmarks.privacy_utility_measure '{"noise_multiplier": 1.2,
        "clipping": "fixed", "rounds": 30, "seed": 0}'

Runs the real training program (configs/digits_dp.py, 300 virtual clients,
Beam-written data under benchmarks/.cache) and reports ε (δ = 1e-5),
held-out accuracy and its wall time. `"dp": false` is the non-DP ceiling.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('GRPC_ENABLE_FORK_SUPPORT', 'false')

import contextlib
import io
import json
import sys
import tempfile
import time

from benchmarks import cross_silo_overhead_measure, harness
from configs import digits_dp
from fedpipe.training import program as training_program


def main(args: dict) -> None:
  all_dir, _ = cross_silo_overhead_measure.prepare(300)
  config = digits_dp.get_config()
  config.data.processed_dir = all_dir
  config.training.rounds = args['rounds']
  config.training.sampling_seed = args.get('seed', 0)
  config.training.checkpoint_every = args['rounds']
  config.dp.enabled = args.get('dp', True)
  if config.dp.enabled:
    config.dp.noise_multiplier = float(args['noise_multiplier'])
    config.dp.clipping = args['clipping']
  started = time.perf_counter()
  with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
    report = training_program.run(config, os.path.join(out, 'run'))
  harness.emit(
    {
      'epsilon': report['epsilon'],
      'test_accuracy': report['test_accuracy'],
      'seconds': time.perf_counter() - started,
    }
  )


if __name__ == '__main__':
  main(json.loads(sys.argv[1]))
