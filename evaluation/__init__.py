"""Benchmarks and quality metrics for asyncgen."""
