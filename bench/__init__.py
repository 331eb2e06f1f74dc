"""Benchmarks: runnable scripts that print a table (see the README). A package so the tests can import them."""
