"""Routing benchmarks: learned routers against the confidence gates."""
