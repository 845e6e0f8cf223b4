"""Shared fixtures: tiny models compiled once per session where tests can share them."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/onnx_builders.py, tests/float_eval.py
