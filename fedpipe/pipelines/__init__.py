"""The Beam preprocessing pipeline: feature spec, validating DoFns, per-client output."""
