"""Typed TFF computations: Keras models, FedAvg/FedProx/FedAdam, DP-FedAvg, (ε, δ) accounting."""
