"""`ringlet pull`, `ringlet models`, `ringlet rm` against the fake hub."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ringlet.cli import main
from ringlet.models import repack_cache
from ringlet.models.loader import resolve_model_path
from tests.support.fake_hub import FakeHub, HubRepo
from tests.support.hub import NUM_LAYERS, REPO_ID
from tests.support.tiny_gguf import write_tiny_gguf


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_pull_list_remove(hub: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "pull", REPO_ID, "--layers", "0:1")
    assert code == 0 and f"{REPO_ID}: ready at" in out
    code, out, _ = run(capsys, "models")
    line = next(line for line in out.splitlines() if line.startswith(REPO_ID))
    assert "partial" in line and f"layers 0 of {NUM_LAYERS}" in line

    code, out, err = run(capsys, "pull", REPO_ID)
    assert code == 0 and "total" in err  # the progress bars
    code, out, _ = run(capsys, "models")
    line = next(line for line in out.splitlines() if line.startswith(REPO_ID))
    assert "complete" in line and f"{NUM_LAYERS}/{NUM_LAYERS} layers" in line

    code, out, _ = run(capsys, "models", "--catalog")
    assert code == 0 and "Qwen/Qwen3-0.6B" in out and "meta-llama/Llama-3.1-8B-Instruct" in out

    code, out, _ = run(capsys, "rm", REPO_ID)
    assert code == 0 and f"removed {REPO_ID}" in out
    code, _, err = run(capsys, "rm", REPO_ID)
    assert code == 2 and f"model '{REPO_ID}' is not in the store" in err


def test_an_ollama_name_is_pulled_shown_copied_and_removed(hub: FakeHub, capsys: pytest.CaptureFixture[str],
                                                           tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", arch="qwen3")
    hub.repos["Qwen/Qwen3-0.6B-GGUF"] = HubRepo({"Qwen3-0.6B-Q8_0.gguf": (tmp_path / "tiny.gguf").read_bytes()})
    code, _, err = run(capsys, "show", "qwen3:0.6b")
    assert code == 2 and "`ringlet pull qwen3:0.6b`" in err
    code, out, err = run(capsys, "pull", "qwen3:0.6b")
    assert code == 0 and "qwen3:0.6b is Qwen/Qwen3-0.6B-GGUF:Q8_0" in err and "qwen3:0.6b: ready at" in out
    code, out, _ = run(capsys, "show", "qwen3:0.6b")
    assert code == 0 and "Qwen/Qwen3-0.6B-GGUF" in out and "qwen3" in out

    code, out, _ = run(capsys, "cp", "qwen3:0.6b", "mine")
    assert code == 0 and "mine:latest is now a name of Qwen/Qwen3-0.6B-GGUF" in out
    code, out, _ = run(capsys, "models")
    assert any(line.startswith("mine:latest") and "Qwen/Qwen3-0.6B-GGUF" in line for line in out.splitlines())
    code, out, _ = run(capsys, "show", "mine")
    assert code == 0 and "Qwen/Qwen3-0.6B-GGUF" in out
    code, out, _ = run(capsys, "rm", "mine")
    assert code == 0 and "removed the name mine:latest" in out
    run(capsys, "cp", "qwen3:0.6b", "again")
    pulled = resolve_model_path("qwen3:0.6b")
    cache = repack_cache.RepackCache.for_files([pulled])
    assert cache is not None
    cached = cache.directory  # where a load keeps its 4-bit groups: an entry of a layer
    cached.mkdir(parents=True)
    (cached / "blk.0.safetensors").write_bytes(b"\0" * 1000)
    code, out, _ = run(capsys, "rm", "qwen3:0.6b")
    assert code == 0 and "removed Qwen/Qwen3-0.6B-GGUF" in out and "its names again:latest" in out
    assert not cached.exists(), "its cache entries go with it"
    code, _, err = run(capsys, "cp", "qwen3:0.6b", "third")
    assert code == 2 and "not pulled yet" in err


def test_pull_errors_are_one_clear_line(hub: FakeHub, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "pull", "nobody/missing")
    assert code == 2 and "ringlet: error: model 'nobody/missing' not found" in err and "Traceback" not in err
    code, _, err = run(capsys, "pull", "not a name")
    assert code == 2 and "expected ORG/NAME" in err
    code, _, err = run(capsys, "pull", REPO_ID, "--offline")
    assert code == 2 and f"offline: {REPO_ID} is not on disk" in err
    code, _, err = run(capsys, "pull", str(tmp_path))
    assert code == 2 and "is a local path" in err
    code, out, _ = run(capsys, "pull", "default")
    assert code == 0 and "embedded" in out
    with pytest.raises(SystemExit):
        main(["pull", REPO_ID, "--layers", "3:1"])
    assert "expected START:END" in capsys.readouterr().err


def test_models_command_in_a_fresh_process(hub: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    env = {**os.environ, "RINGLET_HOME": os.environ["RINGLET_HOME"]}
    result = subprocess.run([sys.executable, "-m", "ringlet", "models"], env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "SmolLM2-135M-Instruct" in result.stdout and "embedded" in result.stdout
    assert "no downloaded models" in result.stdout


def test_show_reads_a_model_file_wherever_it_is(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", arch="qwen3")
    code, out, err = run(capsys, "show", str(tmp_path / "tiny.gguf"))
    assert code == 0, err
    assert str((tmp_path / "tiny.gguf").resolve()) in out and "qwen3" in out
    code, _, err = run(capsys, "show", str(tmp_path / "missing.gguf"))
    assert code == 2 and "no such file or folder" in err and "Traceback" not in err


def test_the_repacked_weights_are_listed_and_deleted_on_request(hub: FakeHub, capsys: pytest.CaptureFixture[str],
                                                                tmp_path: Path) -> None:
    gone = tmp_path / "deleted-since.gguf"  # a file removed outside ringlet: its entries are left behind
    entry = repack_cache.cache_directory(gone)
    entry.mkdir(parents=True)
    (entry / "blk.0.safetensors").write_bytes(b"\0" * 2_000_000)
    code, out, _ = run(capsys, "models")
    assert code == 0 and f"repacked from GGUF files: 2.0 MB in {repack_cache.cache_root()}" in out
    assert "`ringlet rm --repacked`" in out
    code, _, err = run(capsys, "rm")
    assert code == 2 and "--repacked" in err and entry.exists()
    code, out, _ = run(capsys, "rm", "--repacked")
    assert code == 0 and "2.0 MB freed" in out and not entry.exists()
    code, out, _ = run(capsys, "models")
    assert "repacked from GGUF" not in out
