"""Measurement helpers shared by the CLI, the benchmark scripts and the notebook.

Nothing here is needed to use MaMe; it exists to measure it honestly.
"""
