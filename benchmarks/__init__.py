"""Benchmarks: programs, not tests. Each prints figures with a baseline from the same run."""
