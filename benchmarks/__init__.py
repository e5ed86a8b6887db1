"""Benchmarks of torch-rewrite; each script writes JSON and a markdown table for BENCHMARKS.md."""
