"""The `ringlet` command as a user runs it: a real subprocess, the embedded model, no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import pytest

from ringlet.cli import build_parser
from ringlet.cli.bench import prompt_text
from ringlet.cli.run import _converse, model_and_prompt
from ringlet.models.embedded import embedded_model_path
from ringlet.models.tokenizer import Tokenizer

# fp32, as the live nodes run: the int4 file's greedy answer to the capital question is not Paris
# (tests/worker/engines/test_generate.py says why)
FP32 = {**os.environ, "RINGLET_PRECISION": "fp32"}


def ringlet(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ringlet", *args], check=False, capture_output=True, text=True,
                          timeout=timeout, env=FP32)


def subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_core_commands_exist():
    assert {"run", "bench", "node", "chat", "ps", "info"} <= set(subcommands())


@pytest.mark.parametrize("command", subcommands())
def test_every_command_has_help(command):
    result = ringlet(command, "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage: ringlet" in result.stdout and "-h, --help" in result.stdout


@pytest.mark.slow
def test_run_answers_from_the_embedded_model():
    result = ringlet("run", "What is the capital of France?", "--max-tokens", "24", "--stats")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "tokens/s" in result.stderr and "[cpu]" in result.stderr, "the engine named as --engine names it"


def test_run_bad_model_is_one_clear_line():
    result = ringlet("run", "hi", "--model", "/nonexistent/model")
    assert result.returncode == 2
    assert "/nonexistent/model: no such file or folder" in result.stderr and "Traceback" not in result.stderr
    assert "ringlet pull" not in result.stderr, "a path is not downloaded"


def test_run_bad_sampling_value_is_clear():
    result = ringlet("run", "Say hi", "--temperature", "-1")
    assert result.returncode == 2
    assert "temperature" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_bench_json():
    result = ringlet("bench", "--json", "--engine", "cpu", "--prompt-tokens", "130", "--new-tokens", "4", "--repeats",
                     "1")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    r = report["ringlet"]
    assert report["engine"] == "cpu", "the engine's name as --engine takes it, not its library's"
    assert r["prompt_tokens"] == 130 and r["new_tokens"] == 4
    assert r["decode_tokens_per_s"] > 0 and r["time_to_first_token_ms"] > 0 and r["peak_memory_mb"] > 0


def test_settings_come_from_the_environment_and_a_bad_one_is_one_clear_line():
    env = {**os.environ, "RINGLET_ENGINE": "tpu"}
    result = subprocess.run([sys.executable, "-m", "ringlet", "run", "Say hi"], check=False, capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 2 and "unknown engine 'tpu'" in result.stderr and "Traceback" not in result.stderr
    env = {**os.environ, "RINGLET_PRECISION": "int3"}
    for command in (["run", "Say hi"], ["node", "--api-port", "1"]):
        result = subprocess.run([sys.executable, "-m", "ringlet", *command], check=False, capture_output=True, text=True,
                                timeout=120, env=env)
        assert result.returncode == 2, result.stderr
        assert "RINGLET_PRECISION='int3' is not one of" in result.stderr and "Traceback" not in result.stderr


def test_node_refuses_an_origin_written_unlike_a_browsers():
    result = ringlet("node", "--allow-origin", "chat.example.org", "--no-default-instance", timeout=60)
    assert result.returncode == 2
    assert "is not a web origin" in result.stderr and "https://chat.example.org" in result.stderr
    assert "Traceback" not in result.stderr


def test_only_loopback_hosts_count_as_this_machine_only():
    from ringlet.node import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.5"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.20", "my-laptop"))


def test_cluster_token_is_created_once_kept_private_and_a_bad_join_is_one_clear_line(tmp_path):
    env = {**os.environ, "RINGLET_HOME": str(tmp_path)}
    env.pop("RINGLET_CLUSTER_KEY", None)
    first = subprocess.run([sys.executable, "-m", "ringlet", "cluster", "token"], capture_output=True, text=True,
                           env=env, timeout=60, check=False)
    again = subprocess.run([sys.executable, "-m", "ringlet", "cluster", "token"], capture_output=True, text=True,
                           env=env, timeout=60, check=False)
    assert first.returncode == again.returncode == 0 and first.stdout == again.stdout
    assert first.stdout.startswith("ringlet1-") and (tmp_path / "cluster.key").stat().st_mode & 0o777 == 0o600
    bad = subprocess.run([sys.executable, "-m", "ringlet", "node", "--join", "ringlet1-nope"], capture_output=True,
                         text=True, env=env, timeout=60, check=False)
    assert bad.returncode == 2 and "not a ringlet cluster token" in bad.stderr and "Traceback" not in bad.stderr


def test_node_refuses_a_models_dir_that_is_not_a_directory(tmp_path):
    result = ringlet("node", "--models-dir", str(tmp_path / "missing"), "--no-default-instance", timeout=60)
    assert result.returncode == 2 and "is not a directory" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(("words", "model", "expected"), [
    (["qwen3"], None, ("qwen3", None)),
    (["qwen3", "Why", "is the sky blue?"], None, ("qwen3", "Why is the sky blue?")),
    (["What is the capital of France?"], None, (None, "What is the capital of France?")),
    (["hi"], "org/model", ("org/model", "hi")),
    ([], None, (None, None)),
])
def test_run_reads_the_model_then_the_prompt(words, model, expected):
    assert model_and_prompt(words, model) == expected


class ScriptedSession:
    def __init__(self) -> None:
        self.asked: list[list[str]] = []
        self.stats: str | None = None

    def reply(self, messages):
        self.asked.append([m.content for m in messages])
        yield f"answer {len(self.asked)}"


def test_the_chat_keeps_history_reads_several_lines_and_ends_with_bye(monkeypatch, capsys):
    typed = iter(["Hello", '"""First line', "second line", '"""', "/clear", "Again", "/bye", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    session = ScriptedSession()
    assert _converse(session, "Be brief.") == 0
    assert session.asked == [["Be brief.", "Hello"],
                             ["Be brief.", "Hello", "answer 1", "First line\nsecond line\n"],
                             ["Be brief.", "Again"]]
    assert "answer 3" in capsys.readouterr().out


@pytest.mark.slow
def test_run_takes_the_model_first_and_a_piped_prompt():
    piped = subprocess.run([sys.executable, "-m", "ringlet", "run", "SmolLM2-135M-Instruct", "--local", "--max-tokens",
                            "16"], check=False, capture_output=True, text=True, timeout=300,
                           input="What is the capital of France?\n", env=FP32)
    assert piped.returncode == 0 and "Paris" in piped.stdout, piped.stderr
    unknown = ringlet("run", "no-such-model", "Hello there", "--local")
    assert unknown.returncode == 2 and "no-such-model" in unknown.stderr and "Traceback" not in unknown.stderr


@pytest.mark.parametrize("n_tokens", [1, 16, 128, 1000])
def test_the_bench_prompt_encodes_to_the_tokens_asked(n_tokens: int) -> None:
    """As the engine encodes a raw prompt: decoding filler tokens and encoding the text again would merge some."""
    tokenizer = Tokenizer.from_gguf(gguf.GGUFReader(embedded_model_path()))
    assert len(tokenizer.encode(prompt_text(tokenizer, n_tokens), add_special_tokens=True)) == n_tokens
