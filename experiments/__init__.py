"""Experiments that regenerate the published tables and plots (outputs in results/, docs/results.md).

Run everything with ``python -m experiments.all`` (``--quick`` for a smoke run into results/quick/).
"""
