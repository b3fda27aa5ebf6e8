"""The engines' tests; the IPEX environment's own are collected only inside it."""

from __future__ import annotations

import importlib.util

# tests/worker/engines/ipex_env runs only inside the IPEX environment (.venv-ipex), started by test_ipex_env.py
collect_ignore = [] if importlib.util.find_spec("intel_extension_for_pytorch") else ["ipex_env"]
