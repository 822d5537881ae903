"""Benchmarks, run as ``python -m benchmarks.<name> [--quick] [--out DIR]`` (installed as ``updatestore_benchmarks``)."""
