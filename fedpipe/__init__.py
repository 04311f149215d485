"""fedpipe: train one model on data that never leaves its owners, with user-level DP.

Federated learning on TensorFlow Federated 0.87: client data written as
per-client TFRecords with a manifest, user-level differentially private
federated averaging (DP-FedAvg), and a cross-silo runtime in which each data
owner's silo serves its clients over mutual TLS. The programs (`fedpipe-train`,
`fedpipe-silo`, ...) are described in README.md; this is the library.

`import fedpipe` is cheap: it imports neither TensorFlow nor TensorFlow
Federated. Each name below loads its module on first use, and only
`build_dp_fedavg_process`, `train` and calling `connect` bring in TensorFlow.
Every error fedpipe reports to a user is a `fedpipe.FedpipeError`, whose
message names what is wrong and what to do.

Write client data from arrays, one `(x, y)` per client (`x`: `[n,
num_features]` floats, `y`: `n` integer labels), in the layout the
preprocessing pipeline writes::

    import numpy as np
    import fedpipe

    rng = np.random.default_rng(0)

    def examples(n):
      return rng.normal(size=(n, 8)), rng.integers(0, 3, n)

    train = {f'user{i}': examples(40) for i in range(30)}
    test = {f'user{i}': examples(10) for i in range(30)}  # Training evaluates on it.
    manifest = fedpipe.write_client_data('data/mine', train, test, num_classes=3)
    print(manifest.split('train').num_examples)  # 1200

Build the DP-FedAvg process (a `tff.learning.templates.LearningProcess`: clipped
client updates, capped client weights, Gaussian noise; McMahan et al. 2018),
for a TFF training loop of your own::

    import tensorflow_federated as tff

    process = fedpipe.build_dp_fedavg_process(
        model_fn,  # No-argument constructor of a tff.learning model.
        client_optimizer=tff.learning.optimizers.build_sgdm(learning_rate=0.2),
        noise_multiplier=1.0, clip_norm=0.3,
        weight_cap=40.0, expected_total_weight=10.0)  # See computations.dp_parameters.
    state = process.initialize()

Train locally on a client-data directory: user-level DP-FedAvg by default,
config fields as keyword arguments with `__` for the dots, each finished
round reported to `progress` as a `fedpipe.RoundProgress`::

    import tensorflow as tf

    def build_model():  # A new, uncompiled model: 8 features in, 3 logits out.
      return tf.keras.Sequential([
          tf.keras.Input(shape=(8,)),
          tf.keras.layers.Dense(32, activation='relu'),
          tf.keras.layers.Dense(3)])

    result = fedpipe.train(build_model, 'data/mine', output_dir='runs/mine',
                           training__rounds=20, training__clients_per_round=10)
    print(result.summary())  # A fedpipe.TrainResult: test_accuracy=, epsilon=, delta=, ...
    result.model.predict(features)

Connect to silos over mutual TLS and list what each holds (client ids and
example counts, never records; no computation runs)::

    tls = fedpipe.TlsFiles(ca='certs/ca.pem', cert='certs/coordinator.pem',
                           key='certs/coordinator.key')
    with fedpipe.connect('hospital-a=10.0.0.5:8443,hospital-b=10.0.0.6:8443', tls) as fed:
      for dataset in fed.datasets():
        print(dataset.silo, dataset.num_clients('train'), dataset.num_examples('train'))

Train across them: each silo reads its own clients' data, the coordinator
merges their partial sums and adds the DP noise::

      result = fedpipe.train(build_model, fed, output_dir='runs/silos', training__rounds=20)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedpipe.errors import FedpipeError

if TYPE_CHECKING:
  from fedpipe.computations.dp_fedavg import build_dp_fedavg_process
  from fedpipe.data.client_data_writer import write_client_data
  from fedpipe.federation.connection import SiloDataset, SiloFederation, connect
  from fedpipe.federation.tls import TlsFiles
  from fedpipe.training.federated_training import RoundProgress, TrainResult, train

# Public name -> the module that defines it, imported on first access (PEP 562).
_LAZY_ATTRIBUTES = {
  'write_client_data': 'fedpipe.data.client_data_writer',
  'connect': 'fedpipe.federation.connection',
  'SiloFederation': 'fedpipe.federation.connection',
  'SiloDataset': 'fedpipe.federation.connection',
  'TlsFiles': 'fedpipe.federation.tls',
  'train': 'fedpipe.training.federated_training',
  'TrainResult': 'fedpipe.training.federated_training',
  'RoundProgress': 'fedpipe.training.federated_training',
  'build_dp_fedavg_process': 'fedpipe.computations.dp_fedavg',
}

__all__ = [
  'FedpipeError',
  'RoundProgress',
  'SiloDataset',
  'SiloFederation',
  'TlsFiles',
  'TrainResult',
  'build_dp_fedavg_process',
  'connect',
  'train',
  'write_client_data',
]


def _version() -> str:
  from importlib import metadata

  try:
    return metadata.version('fedpipe')
  except metadata.PackageNotFoundError:  # Run from a source tree that is not installed.
    return '0+unknown'


def __getattr__(name: str) -> Any:
  """Imports the module behind a public name on first access, then caches the name.

  Args:
    name: The attribute asked for.

  Returns:
    The public function or class (or `__version__`).

  Raises:
    AttributeError: If `name` is not one of fedpipe's public names.

  Example:

    >>> import fedpipe
    >>> fedpipe.write_client_data.__module__
    'fedpipe.data.client_data_writer'
  """
  if name == '__version__':
    value: Any = _version()
  elif name in _LAZY_ATTRIBUTES:
    value = getattr(importlib.import_module(_LAZY_ATTRIBUTES[name]), name)
  else:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  """The module's names, the lazy public ones included.

  Returns:
    Sorted attribute names.

  Example:

    >>> 'connect' in dir(fedpipe)
    True
  """
  return sorted(set(globals()) | set(__all__) | {'__version__'})
