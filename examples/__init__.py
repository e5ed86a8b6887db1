"""Runnable examples of torch-rewrite; `examples.models` holds the built-in targets of the CLI."""
