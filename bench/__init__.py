"""Benchmarks: standalone (`python -m bench.NAME`), each with `run(...) -> dict`; not tests."""
