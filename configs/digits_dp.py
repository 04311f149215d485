"""Demo: user-level DP-FedAvg on scikit-learn's digits, 300 virtual clients.

(ε, δ) = (5.90, 1e-5) after 100 Poisson-sampled rounds of about 60 clients
(noise multiplier 1.9, fixed clipping at 0.3). A one-hidden-layer MLP: fewer
parameters mean less total noise for the same guarantee. Its held-out
accuracy is measured by the privacy-utility benchmark (benchmarks/RESULTS.md).
"""

from ml_collections import config_dict

from fedpipe.config import base


def get_config() -> config_dict.ConfigDict:
  # The library's default config (`fedpipe.config.base.get_default_config`) is this one.
  config = base.get_default_config()
  config.name = 'digits_dp'
  return config
