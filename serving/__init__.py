"""stablemlp: serving."""
