"""Benchmarks. Each reports figures measured in one run, with the command that produced them."""
