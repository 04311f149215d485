"""fedpipe."""
