"""The benchmark suite: ``python -m bench.run [--quick]`` writes bench/results.json and docs/BENCHMARKS.md."""
