"""Benchmarks: `python -m perf.compare` (see perf/README.md)."""
