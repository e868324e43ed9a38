"""Make ``import rlmcmc`` work from a source checkout without an install."""

import os
import sys

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))
try:
    import rlmcmc  # noqa: F401
except ImportError:
    sys.path.insert(0, SRC)
