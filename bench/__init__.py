"""Benchmark harness for vcfs and the tools a user would pick instead (see docs/benchmarks.md).

Not part of the product packages: run it with `scripts/bench`.
"""
