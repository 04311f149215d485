"""Points of the privacy-utility curve: train the digits demo at noise levels.

    python -m benchmarks.measure_privacy_utility '{"rounds": 40, "seed": 0, "points":
        [{"dp": false}, {"noise_multiplier": 1.2, "clipping": "fixed"}]}'

Runs the real training program (configs/digits_dp.py, 300 virtual clients,
Beam-written data under benchmarks/.cache) once per point, one after another
in this process (each run starts and stops its own isolated worker), and
reports ε (δ = 1e-5), held-out accuracy and seconds for each. A point with
`"dp": false` is the non-DP ceiling.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('GRPC_ENABLE_FORK_SUPPORT', 'false')

# pylint: disable=g-import-not-at-top,wrong-import-position
import contextlib
import io
import json
import sys
import tempfile
import time

from benchmarks import harness
from benchmarks import measure_cross_silo
from configs import digits_dp
from pipelines import training_program


def train_point(processed_dir: str, point: dict, *, rounds: int, seed: int) -> dict:
  """Trains one point of the curve; returns its ε, accuracy and seconds."""
  config = digits_dp.get_config()
  config.data.processed_dir = processed_dir
  config.training.rounds = rounds
  config.training.sampling_seed = seed
  config.training.checkpoint_every = rounds
  config.dp.enabled = point.get('dp', True)
  if config.dp.enabled:
    config.dp.noise_multiplier = float(point['noise_multiplier'])
    config.dp.clipping = point['clipping']
  started = time.perf_counter()
  with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
    report = training_program.run(config, os.path.join(out, 'run'))
  return {'epsilon': report['epsilon'], 'test_accuracy': report['test_accuracy'],
          'seconds': time.perf_counter() - started}


def main(args: dict) -> None:
  all_dir, _ = measure_cross_silo.prepare(300)
  harness.emit({'points': [
      train_point(all_dir, point, rounds=args['rounds'], seed=args.get('seed', 0))
      for point in args['points']]})


if __name__ == '__main__':
  main(json.loads(sys.argv[1]))
