"""Build hook for the optional C kernels (see src/microscale/kernels). Metadata lives in pyproject.toml."""
from setuptools import setup

setup()
