"""Developer tools that are neither library code nor tests (run with ``python -m tools.<name>``)."""
