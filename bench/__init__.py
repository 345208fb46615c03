"""Benchmarks and the mock upstream provider they share with the test suite."""
