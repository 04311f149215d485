"""Experiment configs: the base fields with their defaults, and validation at the edge."""
