"""Digits, 300 virtual clients, FedAvg without differential privacy (the utility ceiling)."""

from ml_collections import config_dict

from fedpipe.config import base


def get_config() -> config_dict.ConfigDict:
  config = base.get_base_config()
  config.name = 'digits_fedavg'
  config.dp.enabled = False
  return config
