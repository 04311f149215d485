"""Federated feature statistics: the query a silo approves, its DP release, and their combination."""
