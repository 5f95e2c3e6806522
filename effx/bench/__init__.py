"""Benchmarks: speed and memory of the attention families and models."""
