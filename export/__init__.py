"""stablemlp: export."""
