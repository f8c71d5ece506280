"""`python -m serving CMD ...` runs the `stablemlp` console script (for environments without it)."""

from .cli import main

raise SystemExit(main())
