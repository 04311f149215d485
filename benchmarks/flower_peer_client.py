"""Flower's simulation of the peer benchmark (runs in Flower's own virtualenv).

    benchmarks/.cache/flower-venv/bin/python -m benchmarks.flower_peer_client '{"clients": 100, "rounds": 20}'

Same data split, model, optimizer, batch size and rounds as fedpipe's side
(benchmarks/flower_peer_measure.py): digits 80/20 stratified split (seed 0), the
training part dealt to clients by the same seeded shuffle, a 64-64-10 MLP,
SGD 0.1, batch 16, one local epoch, every client every round, FedAvg. Only
numpy, scikit-learn, TensorFlow and Flower are imported here.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('RAY_DEDUP_LOGS', '0')

import json
import sys
import time

import flwr as fl
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

RESULT_PREFIX = 'BENCH_RESULT '


def _model():
  inputs = tf.keras.Input(shape=(64,))
  x = tf.keras.layers.Dense(64, activation='relu')(inputs)
  x = tf.keras.layers.Dense(64, activation='relu')(x)
  model = tf.keras.Model(inputs, tf.keras.layers.Dense(10)(x))
  model.compile(
    optimizer=tf.keras.optimizers.SGD(0.1),
    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=['accuracy'],
  )
  return model


def main(args):
  x, y = load_digits(return_X_y=True)
  x_train, x_test, y_train, y_test = train_test_split(
    (x / 16.0).astype(np.float32), y.astype(np.int64), test_size=0.2, random_state=0, stratify=y
  )
  parts = np.array_split(np.random.default_rng(1).permutation(len(y_train)), args['clients'])

  class Client(fl.client.NumPyClient):
    def __init__(self, idx):
      self.idx = idx
      self.model = _model()

    def get_parameters(self, config):
      return self.model.get_weights()

    def fit(self, parameters, config):
      self.model.set_weights(parameters)
      self.model.fit(x_train[self.idx], y_train[self.idx], batch_size=16, epochs=1, verbose=0)
      return self.model.get_weights(), len(self.idx), {}

  def client_fn(cid):
    return Client(parts[int(cid)]).to_client()

  round_ends = []

  def fit_config(server_round):
    round_ends.append(time.perf_counter())
    return {}

  accuracy = {}

  def evaluate_fn(server_round, parameters, config):
    if server_round != args['rounds']:
      return None
    model = _model()
    model.set_weights(parameters)
    loss, acc = model.evaluate(x_test, y_test, verbose=0)
    accuracy['test'] = float(acc)
    return float(loss), {'accuracy': float(acc)}

  strategy = fl.server.strategy.FedAvg(
    fraction_fit=1.0,
    fraction_evaluate=0.0,
    min_fit_clients=args['clients'],
    min_available_clients=args['clients'],
    on_fit_config_fn=fit_config,
    evaluate_fn=evaluate_fn,
  )
  started = time.perf_counter()
  history = fl.simulation.start_simulation(
    client_fn=client_fn,
    num_clients=args['clients'],
    config=fl.server.ServerConfig(num_rounds=args['rounds']),
    strategy=strategy,
    client_resources={'num_cpus': 1},
    ray_init_args={'num_cpus': 2, 'include_dashboard': False},
  )
  total = time.perf_counter() - started
  del history
  # Round r starts when its fit config is requested; the last round ends at return.
  boundaries = round_ends + [time.perf_counter()]
  per_round = [b - a for a, b in zip(boundaries, boundaries[1:])]
  print(
    RESULT_PREFIX
    + json.dumps(
      {
        'round_times': per_round,
        'total_s': total,
        'test_accuracy': accuracy.get('test'),
        'flwr_version': fl.__version__,
      }
    ),
    flush=True,
  )


if __name__ == '__main__':
  main(json.loads(sys.argv[1]))
