"""Neural networks of the engine."""
