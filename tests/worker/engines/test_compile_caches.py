"""torch.compile's and Triton's caches under ringlet's home, so a restart reuses them; where the home cannot be
written, the libraries' own places and one warning, never a failure."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from ringlet.worker.engines.torch.static_decode import use_persistent_compile_caches


@pytest.fixture
def no_cache_variables(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    return monkeypatch


def test_the_caches_go_under_the_home(tmp_path: Path, no_cache_variables: pytest.MonkeyPatch) -> None:
    use_persistent_compile_caches(tmp_path)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "cache" / "triton")
    assert (tmp_path / "cache" / "inductor").is_dir() and (tmp_path / "cache" / "triton").is_dir()


def test_a_home_that_cannot_be_written_leaves_the_libraries_their_own(tmp_path: Path,
                                                                      no_cache_variables: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        use_persistent_compile_caches(tmp_path / "file" / "home")
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ and "TRITON_CACHE_DIR" not in os.environ
    assert "set RINGLET_HOME to a writable folder" in caplog.text
