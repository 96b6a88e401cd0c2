"""Benchmarks: timing and static checks of the model's ops; outside the ops package, may import the model."""
