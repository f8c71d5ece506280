"""`stablemlp bench`: our server against the transport, model and compute floors (and peers), one
run. lineup starts the servers, checks verifies their replies, grid times the cells from loadgen's
processes, stats and report turn the windows into bench.json, bench.md (markdown) and bench.png."""
