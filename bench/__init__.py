"""stablemlp: bench."""
