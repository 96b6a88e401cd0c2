"""Benchmarks: timing of the model's ops; outside the ops package, may import the model."""
