"""stablemlp: protos."""
