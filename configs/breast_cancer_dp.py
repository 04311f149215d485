"""scikit-learn's breast cancer data (30 features, 2 classes) over 100 virtual clients.

The same pipeline as the digits demo, changed by config only: another bundled
source, its own paths, fewer clients (the set has 569 rows). With only 100
clients the privacy bought is modest (ε is printed by the run and its privacy
report): DP needs populations.
"""

from ml_collections import config_dict

from fedpipe.config import base


def get_config() -> config_dict.ConfigDict:
  config = base.get_base_config()
  config.name = 'breast_cancer_dp'
  data = config.data
  data.source = 'sklearn:breast_cancer'
  data.raw_dir = 'data/breast_cancer/raw'
  data.train_files = 'data/breast_cancer/raw/train.csv'
  data.eval_files = 'data/breast_cancer/raw/test.csv'
  data.feature_spec = 'data/breast_cancer/raw/feature_spec.json'
  data.processed_dir = 'data/breast_cancer/clients'
  data.num_clients = 100
  config.model.hidden_units = (32,)
  config.training.rounds = 50
  config.training.clients_per_round = 20
  config.training.client_learning_rate = 0.1
  config.training.server_momentum = 0.5
  config.dp.noise_multiplier = 1.0
  config.dp.clip_norm = 0.5
  return config
