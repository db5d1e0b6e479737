"""Config schema and defaults."""
