"""Experiment kernels shared by the example scripts (importable by worker processes)."""
