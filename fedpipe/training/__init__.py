"""Training runs: experiment building, the round loop, the run directory, reports and plots."""
