"""Runs tests/worker/engines/ipex_env inside the IPEX environment (torch 2.8 + IPEX 2.8) that
scripts/setup-ipex.sh builds, and checks what it reports: IPEX applied, fp32 identical, low precision
parting only at near-ties."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
IPEX_VENV = Path(os.environ.get("RINGLET_IPEX_VENV", ROOT / ".venv-ipex"))


@pytest.mark.slow
@pytest.mark.timeout(1500)  # about a minute on an idle 2-core machine; a loaded one can take ten times that
def test_ipex_engine_on_the_cpu_backend_in_its_own_environment(tmp_path: Path) -> None:
    python = IPEX_VENV / "bin" / "python"
    if not python.exists():
        message = f"no IPEX environment at {IPEX_VENV}: run scripts/setup-ipex.sh first"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    report = tmp_path / "ipex-report.json"
    # IPEX's import would otherwise start a pool of torch.compile workers that nothing here uses
    env = {**os.environ, "RINGLET_IPEX_REPORT": str(report), "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    done = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/worker/engines/ipex_env"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1400, check=False,
    )
    output = done.stdout[-6000:] + done.stderr[-3000:]
    assert done.returncode == 0, output
    assert re.search(r"\b4 passed\b", done.stdout) and "skipped" not in done.stdout, output
    results = json.loads(report.read_text())
    print(json.dumps(results, indent=2))  # shown with -rP: the measured partings and tolerances
    assert results["versions"]["ipex"].startswith("2.8")
    assert results["fp32"]["identical_tokens"] and "_IPEXLinear" in results["fp32"]["ipex_layers"]
    assert "WeightOnlyQuantizedLinear" in results["int8"]["ipex_layers"]
