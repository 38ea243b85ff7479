"""Reference workload and models."""
