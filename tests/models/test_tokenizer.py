"""Tokenizer and chat template against transformers; streaming detokenisation."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import gguf
import pytest
from tokenizers import pre_tokenizers

from ringlet.models.embedded import embedded_model_path
from ringlet.models.tokenizer import DEFAULT_CHAT_TEMPLATE, StreamingDetokenizer, Tokenizer
from ringlet.shared.errors import ModelLoadError

SAMPLES = [
    "Hello, world!",
    "def square(x: int) -> int:\n    return x ** 2  # fast\n",
    "I ❤️ emoji 🤖🎉👍🏽 and flags 🇫🇷",
    "日本語のテキストと中文，还有한국어",
    "   three leading spaces and trailing  ",
    "\n\nnewlines\tand\ttabs\r\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "numbers 1234567 and 3.14159, dates 2024-12-31",
    "don't you're we'll I'M",
    "Ünïcödé façade naïve — “quotes” …",
    "  <|im_end|>x<|endoftext|>",
    "",
]

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(gguf.GGUFReader(embedded_model_path()), source="embedded")


@pytest.fixture(scope="module")
def reference() -> Any:
    transformers = pytest.importorskip("transformers")
    path = embedded_model_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# ---- against transformers -----------------------------------------------------------------


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_decode_match_transformers(tok: Tokenizer, reference: Any, text: str) -> None:
    ids = tok.encode(text)
    assert ids == reference.encode(text)
    assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == reference.decode(ids) == text


def test_special_tokens_are_single_ids(tok: Tokenizer) -> None:
    assert tok.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    assert tok.decode([1, 4093, 2]) == "user"
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)  # SmolLM2: add_bos_token = false
    assert tok.bos_token_id == 1 and tok.eos_token_ids == [2]
    assert tok.vocab_size == 49152
    assert tok.id_to_token(1) == "<|im_start|>" and tok.id_to_token(216) == "Ġ"


def test_chat_template_matches_transformers(tok: Tokenizer, reference: Any) -> None:
    full = tok.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert full == reference.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=False)
    assert full.startswith("<|im_start|>system\nYou are a terse assistant.<|im_end|>\n")
    prompt = tok.apply_chat_template(CONVERSATION[1:2])
    assert prompt == reference.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True)
    assert "SmolLM" in prompt  # the template's default system prompt
    assert prompt.endswith("<|im_start|>assistant\n")


# ---- streaming ----------------------------------------------------------------------------


def stream(detok: StreamingDetokenizer, ids: Sequence[int]) -> list[str]:
    return [detok.add_token(i) for i in ids] + [detok.finalize()]


@pytest.mark.parametrize("text", [
    "Robots 🤖 party 🎉👍🏽 tonight! ❤️ 🇫🇷",
    "日本語のテキストです。中文也可以，한국어도.",
    "mixed: naïve café 🤖 日本 ok",
])
def test_streaming_reproduces_decode_without_broken_characters(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    deltas = stream(StreamingDetokenizer(tok), ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    # these texts have characters spread over several byte tokens, so something was held back
    assert "" in deltas[:-1]


def test_streaming_keeps_spaces(tok: Tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    deltas = [d for d in stream(StreamingDetokenizer(tok), tok.encode(text)) if d]
    assert "".join(deltas) == text
    assert deltas[:4] == ["The", " quick", " brown", " fox"]


def test_streaming_skips_special_tokens_and_flushes_partial_bytes(tok: Tokenizer) -> None:
    detok = StreamingDetokenizer(tok)
    robot = tok.encode("🤖")
    assert len(robot) > 1
    assert [detok.add_token(i) for i in [2, *robot[:-1]]] == [""] * len(robot)  # <|im_end|>, then half a robot
    assert detok.finalize() == "\ufffd"  # what is left at the end is flushed as-is
    assert detok.add_token(robot[0]) == ""  # finalize reset the state
    assert [detok.add_token(i) for i in robot[1:]][-1] == "🤖"


def test_streaming_window_stays_small(tok: Tokenizer) -> None:
    class CountingDecoder:
        longest = 0

        def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
            self.longest = max(self.longest, len(ids))
            return tok.decode(ids, skip_special_tokens)

    counter = CountingDecoder()
    text = "A long answer with emoji 🤖 and 日本語 repeated. " * 40
    ids = tok.encode(text)
    assert len(ids) > 400
    assert "".join(stream(StreamingDetokenizer(counter), ids)) == text
    assert counter.longest <= 8


# ---- chat templates -----------------------------------------------------------------------


def template_tokenizer(tok: Tokenizer, template: str | None) -> Tokenizer:
    return Tokenizer(tok.backend, chat_template=template, template_tokens={"bos_token": "<s>"})


def test_default_chat_template_is_chatml(tok: Tokenizer) -> None:
    plain = template_tokenizer(tok, None)
    assert plain.chat_template is None
    out = plain.apply_chat_template(CONVERSATION[1:2])
    assert out == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert "{%" in DEFAULT_CHAT_TEMPLATE


def test_template_helpers_and_sandbox(tok: Tokenizer) -> None:
    helpers = template_tokenizer(
        tok,
        "{{ bos_token }}{{ messages[0]['content'] | tojson }}|{{ strftime_now('%Y') }}\n"
        "{% for m in messages %}\n  {% if m %}{{ m['role'] }}{% endif %}\n{% endfor %}",
    )
    out = helpers.apply_chat_template([{"role": "user", "content": "<b>é</b>"}], add_generation_prompt=False)
    # tojson does not HTML-escape or ASCII-escape; trim_blocks/lstrip_blocks drop the block whitespace
    assert out == f'<s>"<b>é</b>"|{datetime.now().year}\nuser'

    strict = template_tokenizer(tok, "{% if messages[0]['role'] != 'user' %}{{ raise_exception('roles!') }}{% endif %}")
    with pytest.raises(ValueError, match="roles!"):
        strict.apply_chat_template([{"role": "assistant", "content": "x"}])

    mutating = template_tokenizer(tok, "{{ messages.append({'role': 'x'}) }}")
    with pytest.raises(ValueError, match="chat template"):
        mutating.apply_chat_template([{"role": "user", "content": "x"}])


def test_extra_template_kwargs_reach_the_template(tok: Tokenizer) -> None:
    thinking = template_tokenizer(tok, "{% if enable_thinking is defined and not enable_thinking %}no-think{% endif %}")
    assert thinking.apply_chat_template([], enable_thinking=False) == "no-think"
    assert thinking.apply_chat_template([]) == ""


# ---- Hugging Face directories -------------------------------------------------------------


def test_from_hf_dir(tok: Tokenizer, tmp_path: Path) -> None:
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": True},
        "chat_template": [{"name": "default", "template": "config:{{ messages[0]['content'] }}"},
                          {"name": "tool_use", "template": "tools"}],
    }))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    hf = Tokenizer.from_hf_dir(tmp_path)
    for text in SAMPLES:
        assert hf.encode(text) == tok.encode(text)
    assert hf.bos_token_id == 1
    assert hf.eos_token_ids == [2, 0]
    assert hf.apply_chat_template([{"role": "user", "content": "x"}]) == "config:x"

    (tmp_path / "chat_template.jinja").write_text("jinja:{{ eos_token }}")
    assert Tokenizer.from_hf_dir(tmp_path).apply_chat_template([]) == "jinja:<|im_end|>"


def test_from_hf_dir_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


# ---- GGUF metadata variants ---------------------------------------------------------------


def byte_alphabet_metadata(pre: str, **extra: Any) -> dict[str, Any]:
    """A minimal byte-level vocabulary: the 256 byte characters, one merge, one control token."""
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "<|begin|>"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 257 + [3],
        "tokenizer.ggml.merges": ["Ġ t"],
        "tokenizer.ggml.bos_token_id": 257,
        "tokenizer.ggml.eos_token_id": 257,
        **extra,
    }


@pytest.mark.parametrize("pre, expected", [
    # llama.cpp's splits: Llama 3 groups digits by three, Qwen2 and SmolLM take them one by one
    ("llama-bpe", ["Hello", "Ġ", "123", "45", "Ġworld", "!!"]),
    ("qwen2", ["Hello", "Ġ", "1", "2", "3", "4", "5", "Ġworld", "!!"]),
    ("smollm", ["Hello", "Ġ", "1", "2", "3", "4", "5", "Ġworld", "!!"]),
    ("gpt-2", ["Hello", "Ġ12345", "Ġworld", "!!"]),
])
def test_gguf_pre_tokenizer_follows_tokenizer_ggml_pre(pre: str, expected: list[str]) -> None:
    backend = Tokenizer.from_gguf(byte_alphabet_metadata(pre)).backend
    assert backend.pre_tokenizer is not None
    pieces = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str("Hello 12345 world!!")]
    assert pieces == expected


def test_gguf_bos_flag() -> None:
    llama3 = Tokenizer.from_gguf(byte_alphabet_metadata("llama-bpe"))
    t, space_t = llama3.backend.token_to_id("t"), llama3.backend.token_to_id("Ġt")
    # llama.cpp adds BOS to Llama 3 vocabularies unless the file says not to
    assert llama3.encode("t t") == [257, t, space_t]
    assert llama3.encode("t t", add_special_tokens=False) == [t, space_t]
    assert llama3.encode("<|begin|>t") == [257, 257, t]
    no_bos = Tokenizer.from_gguf(byte_alphabet_metadata("llama-bpe", **{"tokenizer.ggml.add_bos_token": False}))
    assert no_bos.encode("t") == [t]
    assert Tokenizer.from_gguf(byte_alphabet_metadata("smollm")).encode("t") == [t]


def test_gguf_byte_level_reader_refuses_other_vocabularies() -> None:
    with pytest.raises(ModelLoadError, match="'llama' is not byte-level BPE"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]}, source="x.gguf")


@pytest.mark.parametrize("template, bound", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "loops ran over"),
    ("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}", "wrote over"),
    ("{{ 'x' * 10**9 }}", "wrote over"),
    ("{{ 2 ** 100000000 }}", "to the power"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed"),
    ("{% for i in range(10**12) %}{% endfor %}", "Range too big"),  # the sandbox's own bound: an OverflowError
    ("{{ messages | length // 0 }}", "ZeroDivisionError"),
    ("{{ messages[0].content + 1 }}", "TypeError"),
])
def test_a_hostile_chat_template_is_cut_off_and_the_tokenizer_keeps_working(tok: Tokenizer, template: str,
                                                                            bound: str) -> None:
    hostile = template_tokenizer(tok, template)
    began = time.monotonic()
    with pytest.raises(ValueError, match=f"chat template failed.*{bound}"):
        hostile.apply_chat_template(CONVERSATION[1:2])
    assert time.monotonic() - began < 10
    assert "capital of France" in template_tokenizer(tok, None).apply_chat_template(CONVERSATION[1:2])


def test_templates_with_ordinary_loops_render_as_before(tok: Tokenizer) -> None:
    template = "{% for i in range(3) %}{{ i }}{% endfor %}{% for m in messages %}[{{ m.content * 2 }}]{% endfor %}"
    assert template_tokenizer(tok, template).apply_chat_template([{"role": "user", "content": "ab"}]) == "012[abab]"
