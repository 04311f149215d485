"""Execution on one machine: the isolated TFF worker and the contexts that reach it."""
