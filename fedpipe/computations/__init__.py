"""Typed TFF computations: Keras model wrapping, FedAvg/FedProx/FedAdam, DP aggregation, accounting."""
