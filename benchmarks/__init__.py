"""Benchmarks: each prints its measurement next to a baseline measured in the same run."""
