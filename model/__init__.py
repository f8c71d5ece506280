"""stablemlp: model."""
