"""needle test suite."""
