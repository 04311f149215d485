"""fedpipe's side of the Flower comparison (see benchmarks/flower_peer_client.py).

    python -m benchmarks.flower_peer_measure '{"clients": 100, "rounds": 20, "engine": "cohort"}'

FedAvg (no DP) over the same split, model and hyperparameters, on fedpipe's
isolated worker reading the clients' data where it runs; then the held-out
accuracy of the final model. `engine`: `cohort` (what `runtime.engine=auto`
trains locally: the clients as cohorts, at least one per core) or
`per_client` (one TFF client per client).
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('GRPC_ENABLE_FORK_SUPPORT', 'false')

import json
import sys
import time

import tensorflow as tf
import tensorflow_federated as tff

from benchmarks import harness, workloads
from fedpipe.computations import client_data, cohort_data, cohort_fedavg, fedavg, keras_model
from fedpipe.runtime import execution_context


def main(args: dict) -> None:
  w = workloads.load('digits_train')
  _, x_test, _, y_test = workloads.digits_split()
  data_dir = workloads.client_data_dir(w, args['clients'])
  ids = [workloads.client_id(i) for i in range(args['clients'])]

  def build():
    return keras_model.build_mlp(num_features=64, num_classes=10, hidden_units=(64, 64))

  storage = workloads.client_data_storage(w, args['clients'])
  model_fn = keras_model.build_model_fn(build, num_features=64)
  server = tff.learning.optimizers.build_sgdm(1.0)
  if args.get('engine', 'cohort') == 'cohort':
    process = cohort_fedavg.build_cohort_dp_fedavg_process(
      model_fn,
      build,
      num_features=64,
      aggregator=None,
      cohort_fn=cohort_data.make_cohort_fn(
        split='train', num_features=64, batch_size=16, storage=storage
      ),
      client_learning_rate=0.1,
      server_optimizer=server,
    )
    counts = dict(zip(ids, workloads.client_example_counts(w, args['clients'])))
    round_input = cohort_fedavg.group_into_cohorts(
      ids, counts, max_cohort_size=len(ids), min_cohorts=os.cpu_count() or 1
    )
  else:
    process = fedavg.build_fedavg_process(
      model_fn,
      client_optimizer=tff.learning.optimizers.build_sgdm(0.1),
      server_optimizer=server,
      dataset_fn=client_data.make_dataset_fn(
        split='train', num_features=64, batch_size=16, storage=storage
      ),
    )
    round_input = ids
  times = []
  with execution_context.local_worker_context(data_dir):
    state = process.initialize()
    for _ in range(args['rounds']):
      started = time.perf_counter()
      state = process.next(state, round_input).state
      times.append(time.perf_counter() - started)
    weights = process.get_model_weights(state)
  model = build()
  weights.assign_weights_to(model)
  model.compile(
    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=['accuracy']
  )
  _, accuracy = model.evaluate(x_test, y_test, verbose=0)
  harness.emit({'round_times': times, 'test_accuracy': float(accuracy)})


if __name__ == '__main__':
  main(json.loads(sys.argv[1]))
