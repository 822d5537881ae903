"""Benchmarks, run as ``python -m benchmarks.<name> [--quick]``; results land in ``benchmarks/results/``."""
