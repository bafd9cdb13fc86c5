"""Benchmarks (`make bench`): each module prints `name: value` lines and ratios."""
