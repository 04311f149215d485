"""One point of the privacy-utility curve: the digits demo at one noise level, over sampling seeds.

    python -m benchmarks.privacy_utility_measure '{"noise_multiplier": 1.2,
        "clipping": "fixed", "rounds": 100, "seeds": [1, 2, 3, 4, 5]}'

Builds configs/digits_dp.py's experiment once (300 virtual clients,
Beam-written data under benchmarks/.cache, the cohort engine) and trains it
once per sampling seed, each from the same initial model, on a local isolated
worker, then evaluates on the held-out users. Reports ε (δ = 1e-5), each
seed's held-out accuracy and the median seconds a run took. `"dp": false` is
the non-DP ceiling; `"config"` sets other fields first, by dotted path
(`{"model.activation": "relu"}`).
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('GRPC_ENABLE_FORK_SUPPORT', 'false')

import json
import statistics
import sys
import tempfile
import time

from benchmarks import cross_silo_overhead_measure, harness
from configs import digits_dp
from fedpipe.computations import client_sampling
from fedpipe.config import validation
from fedpipe.data import manifest as manifest_lib
from fedpipe.runtime import execution_context
from fedpipe.training import experiment as experiment_lib
from fedpipe.training import loop


def main(args: dict) -> None:
  all_dir, _ = cross_silo_overhead_measure.prepare(300)
  config = digits_dp.get_config()
  config.data.processed_dir = all_dir
  validation.apply_overrides(config, args.get('config', {}))
  config.training.rounds = args['rounds']
  config.dp.enabled = args.get('dp', True)
  if config.dp.enabled:
    config.dp.noise_multiplier = float(args['noise_multiplier'])
    config.dp.clipping = args['clipping']
  manifest = manifest_lib.read_manifest(all_dir)
  accuracies, seconds = [], []
  with tempfile.TemporaryDirectory() as logs:
    with execution_context.local_worker_context(all_dir, log_path=os.path.join(logs, 'worker.log')):
      experiment = experiment_lib.build_experiment(config, manifest)
      process = experiment.train_process
      for seed in args['seeds']:
        started = time.perf_counter()
        state = process.initialize()
        for round_num in range(1, experiment.rounds + 1):
          clients = client_sampling.sample_clients(
            experiment.train_client_ids,
            scheme=experiment.sampling,
            round_num=round_num,
            seed=seed,
          )
          state = process.next(state, experiment.round_input(clients)).state
        metrics = loop.evaluate(experiment, process.get_model_weights(state))
        accuracies.append(metrics['accuracy'])
        seconds.append(time.perf_counter() - started)
  epsilon = experiment_lib.epsilon_after(experiment, experiment.rounds)
  harness.emit(
    {
      'epsilon': float('inf') if epsilon is None else epsilon,
      'accuracies': accuracies,
      'seconds': statistics.median(seconds),
    }
  )


if __name__ == '__main__':
  main(json.loads(sys.argv[1]))
