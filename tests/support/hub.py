"""Fixtures (registered for every test by tests/conftest.py): a random-weight tiny Llama split over several
safetensors files, served by a local fake hub."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fake_hub import FakeHub, HubRepo

REPO_ID = "ringlet-test/tiny-llama"
NUM_LAYERS = 4
WORDS = ["hello", "world", "the", "a", "cat", "dog", "sat", "on", "mat", "is", "good", "day", "what", "how",
         "are", "you", "i", "am", "fine", "thanks", "yes", "no", "one", "two", "three", "red", "blue", "green",
         "big", "small", "run", "walk", "eat", "sleep", "sun", "moon", "star", "sky", "sea", "tree", ".", "?", "!"]
SPECIAL = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def _tokenizer_files() -> dict[str, bytes]:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    return {"tokenizer.json": tokenizer.to_str().encode(), "tokenizer_config.json": json.dumps(config).encode()}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Files of a 4-layer random Llama saved in ~100 KB shards (7 files + index), plus a tokenizer."""
    import torch
    import transformers

    directory = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory, max_shard_size="100KB")
    files = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    files.update(_tokenizer_files())
    files["README.md"] = b"# tiny llama\n"  # not a model file: never fetched
    files["original/consolidated.00.pth"] = b"not needed"  # Meta's own layout: never fetched
    assert sum(name.endswith(".safetensors") for name in files) > 3, "the checkpoint should span several files"
    return files


@pytest.fixture
def hub(tiny_checkpoint: dict[str, bytes], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A fake hub serving the tiny checkpoint, with HF_ENDPOINT and RINGLET_HOME pointing at test places."""
    server = FakeHub(repos={REPO_ID: HubRepo(dict(tiny_checkpoint))}).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("RINGLET_HOME", str(tmp_path / "home"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "RINGLET_MODEL_DIRS"):
        monkeypatch.delenv(name, raising=False)
    yield server
    server.stop()


@pytest.fixture
def weight_map(tiny_checkpoint: dict[str, bytes]) -> dict[str, str]:
    return json.loads(tiny_checkpoint["model.safetensors.index.json"])["weight_map"]
