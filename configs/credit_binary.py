"""Synthetic credit data (numeric and categorical columns, a binary label) over 6,000 users.

The bundled `synthetic_credit` source (fedpipe/datasets/synthetic_credit.py):
about 45,000 rows, 3 to 15 per user, of age, income, balance and tenure plus
region (one rare value) and product, with a label drawn from a known logistic
model, so the best possible held-out accuracy is known (about 0.83 for seed 0;
the majority class scores about 0.64). Its feature spec is a schema-version-2
draft: declared ranges, no statistics or vocabularies, which a federated
statistics study computes before training.

User-level DP-FedAvg: 200 Poisson-sampled rounds of about 200 of the 6,000
users (q = 1/30), noise multiplier 1.1, fixed clipping at 0.5: (ε, δ) =
(2.93, 1e-5) with the RDP accountant (the run's privacy report gives ε).
"""

from ml_collections import config_dict

from fedpipe.config import base


def get_config() -> config_dict.ConfigDict:
  config = base.get_base_config()
  config.name = 'credit_binary'
  data = config.data
  data.source = 'synthetic_credit'
  data.raw_dir = 'data/credit/raw'
  data.train_files = 'data/credit/raw/train.csv'
  data.eval_files = 'data/credit/raw/test.csv'
  data.feature_spec = 'data/credit/raw/feature_spec.json'
  data.processed_dir = 'data/credit/clients'
  data.num_clients = 6000  # The number of users generated.
  # The statistics study needs a sample of each user, not all of it: fewer
  # rows per user mean less noise for the same ε (a usable std for skewed
  # columns such as tenure_months, declared up to 600 months).
  data.statistics.max_rows_per_user = 5
  config.model.hidden_units = (32,)
  config.training.rounds = 200
  config.training.clients_per_round = 200
  config.training.client_learning_rate = 0.2
  config.training.server_momentum = 0.5
  config.dp.noise_multiplier = 1.1
  config.dp.clip_norm = 0.5
  return config
