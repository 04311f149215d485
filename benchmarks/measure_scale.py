"""One measurement of scale: seconds per round and memory for a population and round size.

    python -m benchmarks.measure_scale '{"population": 10000, "clients_per_round": 100,
                                         "rounds": 4, "memory_every": 0}'

Virtual silos on one isolated worker: `population` clients of 8 examples
each (the `tiny` workload), DP-FedAvg over `clients_per_round` clients drawn
without replacement each round. Reports seconds per round and the peak
resident memory of this coordinator process and of the worker; with
`memory_every` > 0 also their current memory every that many rounds.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('GRPC_ENABLE_FORK_SUPPORT', 'false')

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import sys
import time

import tensorflow_federated as tff

from benchmarks import harness
from benchmarks import workloads
from computations import client_data
from computations import client_sampling
from computations import dp_aggregator
from computations import fedavg
from computations import keras_model
from computations import privacy_accounting
from runtime import execution_context

EXAMPLES_PER_CLIENT = 8


def main(args: dict) -> None:
  population, per_round = args['population'], args['clients_per_round']
  w = workloads.load('tiny', num_examples=population * EXAMPLES_PER_CLIENT)
  data_dir = workloads.client_data_dir(w, population)
  ids = [workloads.client_id(i) for i in range(population)]
  scheme = privacy_accounting.SamplingScheme('fixed_size', population, per_round)
  model_fn = keras_model.build_model_fn(
      lambda: keras_model.build_mlp(num_features=w.num_features, num_classes=w.num_classes,
                                    hidden_units=w.hidden_units),
      num_features=w.num_features)
  process = fedavg.build_fedavg_process(
      model_fn,
      client_optimizer=tff.learning.optimizers.build_sgdm(0.1),
      server_optimizer=tff.learning.optimizers.build_sgdm(1.0, momentum=0.5),
      model_aggregator=dp_aggregator.CappedWeightDPFactory.gaussian_fixed(
          noise_multiplier=1.0, clip_norm=1.0, weight_cap=EXAMPLES_PER_CLIENT,
          expected_total_weight=float(per_round)),
      dataset_fn=client_data.make_dataset_fn(
          split='train', num_features=w.num_features, batch_size=16))
  memory = []
  with execution_context.local_worker_context(data_dir) as worker:
    worker_pid = harness.worker_pids_of(worker.pid)[0]
    state = process.initialize()
    times = []
    for round_num in range(1, args['rounds'] + 1):
      clients = client_sampling.sample_clients(ids, scheme=scheme, round_num=round_num, seed=0)
      started = time.perf_counter()
      state = process.next(state, clients).state
      times.append(time.perf_counter() - started)
      every = args.get('memory_every', 0)
      if every and (round_num % every == 0 or round_num == 1):
        memory.append([round_num, harness.rss_mb(), harness.rss_mb(worker_pid)])
    worker_peak = harness.peak_rss_mb(worker_pid)
  harness.emit({
      'median_s': harness.median(times[1:] if len(times) > 1 else times),
      'first_round_s': times[0],
      'coordinator_peak_mb': harness.peak_rss_mb(),
      'worker_peak_mb': worker_peak,
      'memory': memory,
  })


if __name__ == '__main__':
  main(json.loads(sys.argv[1]))
