"""Benchmarks (see bench/README.md). Run the scripts from the repository root."""

from __future__ import annotations

import sys
from pathlib import Path

# A script run as `python bench/x.py` has bench/ first on sys.path, where
# bench/profile.py would shadow the standard library's `profile`: drop it.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p != _HERE]
