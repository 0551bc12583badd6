"""Benchmarks of the product against bare Procrastinate: python -m bench."""
