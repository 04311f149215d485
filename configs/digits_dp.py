"""Demo: user-level DP-FedAvg on scikit-learn's digits, 300 virtual clients."""

from ml_collections import config_dict

from configs import base


def get_config() -> config_dict.ConfigDict:
  config = base.get_base_config()
  config.name = 'digits_dp'
  config.dp.noise_multiplier = 1.0
  return config
