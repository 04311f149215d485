"""Bundled data sets and their partitioning into clients and silos."""
