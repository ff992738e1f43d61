"""Numpy reference implementations of qcompile's custom ops (ground truth for kernels and numerics)."""
