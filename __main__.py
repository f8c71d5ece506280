"""`python -m stablemlp COMMAND ...`: the `stablemlp` console script, where it is not on PATH."""

from .cli import main

raise SystemExit(main())
