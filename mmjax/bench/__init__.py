"""Benchmarks: `python -m mmjax.bench {train,loss,scale} ...` (see README, Performance)."""
