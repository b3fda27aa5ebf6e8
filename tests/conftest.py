"""Settings for every test, and for the node and runner processes the tests start (they inherit the environment)."""

import os

# CPU decode steps stay eager: compiling takes minutes and most tests decode a few tokens. The compiled path has its
# own tests (tests/generation/test_cpu_compile.py), which ask for it explicitly.
os.environ.setdefault("RINGLET_CPU_COMPILE", "0")

# Without a GPU, Triton kernels (the fused CUDA decode step) run in Triton's interpreter on CPU tensors. Read when a
# kernel is defined, so it is set before anything imports triton.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
