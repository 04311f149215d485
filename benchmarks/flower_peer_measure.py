"""fedpipe's side of the Flower comparison (see benchmarks/flower_peer_client.py).

    python -m benchmarks.flower_peer_measure '{"clients": 100, "rounds": 20}'

FedAvg (no DP) over the same split, model and hyperparameters, on fedpipe's
isolated worker reading per-client TFRecords; then the held-out accuracy of
the final model.
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
from fedpipe.computations import client_data, fedavg, keras_model
from fedpipe.runtime import execution_context


def main(args: dict) -> None:
  w = workloads.load('digits_train')
  _, x_test, _, y_test = workloads.digits_split()
  data_dir = workloads.client_data_dir(w, args['clients'])
  ids = [workloads.client_id(i) for i in range(args['clients'])]

  def build():
    return keras_model.build_mlp(num_features=64, num_classes=10, hidden_units=(64, 64))

  process = fedavg.build_fedavg_process(
    keras_model.build_model_fn(build, num_features=64),
    client_optimizer=tff.learning.optimizers.build_sgdm(0.1),
    server_optimizer=tff.learning.optimizers.build_sgdm(1.0),
    dataset_fn=client_data.make_dataset_fn(split='train', num_features=64, batch_size=16),
  )
  times = []
  with execution_context.local_worker_context(data_dir):
    state = process.initialize()
    for _ in range(args['rounds']):
      started = time.perf_counter()
      state = process.next(state, ids).state
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
