"""Across silos: TLS and certificates, the silo protocol, the silo server and the coordinator's client."""
