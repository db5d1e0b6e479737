"""parallelism."""
