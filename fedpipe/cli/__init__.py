"""The absl programs (`fedpipe-*` console scripts): they parse flags, call the library, print."""
