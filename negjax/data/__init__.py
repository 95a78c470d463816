"""Data: the shapes world, the negation caption engine, training records, NegBench files."""
