"""Benchmarks of a reconciliation tick against the test fakes (not part of the pytest run)."""
