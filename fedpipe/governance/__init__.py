"""What a silo runs on its data: policies, study requests, fingerprints, review, the gate, the audit."""
