"""IPEX import failures, from package metadata and a broken installation on sys.path (not this
environment's: it has no IPEX). The engine falls back to native torch.xpu, or, when IPEX is required,
fails before reading any weights with the message a user needs."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from ringlet.shared.config import EngineConfig
from ringlet.worker.engines.engine_utils import ipex_status
from ringlet.worker.engines.ipex import IPEXEngineError
from ringlet.worker.engines.ipex.device import XpuDevice
from ringlet.worker.engines.ipex.utils_ipex import import_ipex, load_ipex_engine
from tests.support.xpu import FakeXpu, fake_runtime

MATCHING = ".".join(torch.__version__.split(".")[:2]) + ".0"


def install_fake_ipex(root: Path, version: str, init: str) -> Path:
    """A site directory holding an intel_extension_for_pytorch distribution of `version` whose import runs `init`."""
    package = root / "intel_extension_for_pytorch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(init)
    dist = root / f"intel_extension_for_pytorch-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: intel-extension-for-pytorch\nVersion: {version}\n")
    return root


@pytest.fixture
def broken_ipex(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """IPEX built for this torch whose shared library is missing, as on a machine without oneAPI's runtime."""
    site = install_fake_ipex(tmp_path, MATCHING, "raise ImportError('libintel-ext-pt-gpu.so: cannot open shared "
                                                 "object file: No such file or directory')\n")
    monkeypatch.syspath_prepend(str(site))
    yield
    sys.modules.pop("intel_extension_for_pytorch", None)


@pytest.fixture
def mismatched_ipex(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """IPEX 2.8.0 next to another torch; importing it would end the process, so it must not be imported."""
    site = install_fake_ipex(tmp_path, "2.8.0", "raise SystemExit('imported IPEX against the wrong torch')\n")
    monkeypatch.syspath_prepend(str(site))
    yield
    sys.modules.pop("intel_extension_for_pytorch", None)


def test_without_ipex_the_status_says_so() -> None:
    status = ipex_status()
    assert not status.usable and status.version is None and "not installed" in status.reason
    assert import_ipex("auto") is None
    with pytest.raises(IPEXEngineError, match="IPEX is required but intel-extension-for-pytorch is not installed"):
        import_ipex("require")


def test_broken_install_degrades_to_native_torch_with_one_warning(broken_ipex, caplog) -> None:  # type: ignore[no-untyped-def]
    assert ipex_status().usable  # its metadata matches this torch: only importing shows the problem
    with caplog.at_level(logging.WARNING):
        assert import_ipex("auto") is None
    [line] = [r.getMessage() for r in caplog.records if r.name.endswith("utils_ipex")]
    assert f"intel-extension-for-pytorch {MATCHING} is installed but failed to import" in line
    assert "libintel-ext-pt-gpu.so" in line and "running on native torch" in line


def test_broken_install_is_an_error_when_ipex_is_required(broken_ipex) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(IPEXEngineError, match="failed to import .*libintel-ext-pt-gpu.so.*fix: reinstall"):
        load_ipex_engine(None, device=XpuDevice(fake_runtime(FakeXpu())), config=EngineConfig(precision="fp32"), optimization="ipex")


def test_version_mismatch_is_found_without_importing(mismatched_ipex) -> None:  # type: ignore[no-untyped-def]
    status = ipex_status()
    assert not status.usable and status.version == "2.8.0"
    assert f"needs PyTorch 2.8.*, but this is PyTorch {torch.__version__}" in status.reason
    assert import_ipex("auto") is None  # and did not import it: that would have raised SystemExit
    with pytest.raises(IPEXEngineError, match=r"needs PyTorch 2\.8\.\*.*fix: pip install torch==2\.8\.0 --index-url https://download\.pytorch\.org/whl/xpu"):
        import_ipex("require")
    assert "intel_extension_for_pytorch" not in sys.modules


def test_the_cpu_backend_cannot_run_without_ipex() -> None:
    with pytest.raises(IPEXEngineError, match="IPEX is required"):
        load_ipex_engine(None, device="cpu")
    with pytest.raises(IPEXEngineError, match="without IPEX use the cpu engine"):
        load_ipex_engine(None, device="cpu", optimization="eager")
