"""Speed and memory benchmarks (results in benchmarks/RESULTS.md). Run from the repository root as
``python -m benchmarks.decode``, ``benchmarks.pipeline``, ``benchmarks.quantize`` or ``benchmarks.vocode``."""
