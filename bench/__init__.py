"""The benchmarks: `stablemlp bench` (serving speed against floors and peers), `stablemlp bench
quality` (the model against baselines) and tools run as `python -m stablemlp.bench.MODULE` (the CSV
scale run, floods, the soak, two builds side by side). In the wheel; not in the serving image."""
