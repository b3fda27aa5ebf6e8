"""Model cards: parameter counts against transformers and published numbers, stage sizes, derived cards."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from ringlet.models import loader
from ringlet.models.catalog import (
    CPU_STORED_INT4,
    CURATED_CONFIGS,
    WEIGHT_ONLY_INT8,
    XPU_INT4,
    card_from_config,
    card_from_path,
    catalog,
    embedded_card,
    find_card,
    resolve_card,
)
from ringlet.models.download import HubUnreachable, download_model
from ringlet.models.loader import read_model_config
from ringlet.models.quant import cpu_supports_bf16
from ringlet.models.store import ModelStore
from ringlet.shared.errors import ModelLoadError
from ringlet.shared.instances import InstanceType
from ringlet.worker.engines.torch.engine import load_torch_stage
from tests.support.fake_hub import FakeHub
from tests.support.hub import NUM_LAYERS, REPO_ID
from tests.support.tiny_gguf import write_tiny_gguf

# Parameter counts as the model makers publish them (safetensors metadata / model cards).
PUBLISHED_PARAMETERS = {
    "meta-llama/Llama-3.2-1B-Instruct": 1_235_814_400,
    "meta-llama/Llama-3.1-8B-Instruct": 8_030_261_248,
    "Qwen/Qwen2.5-0.5B-Instruct": 494_032_768,
    "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512,
    "mistralai/Mistral-7B-Instruct-v0.3": 7_248_023_552,
    "HuggingFaceTB/SmolLM2-135M-Instruct": 134_515_008,
}

TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 256}


@pytest.mark.parametrize("repo_id", sorted(PUBLISHED_PARAMETERS))
def test_curated_parameter_counts_match_the_published_ones(repo_id: str) -> None:
    card = find_card(repo_id)
    assert card is not None and card.num_parameters == PUBLISHED_PARAMETERS[repo_id]


def test_catalog_lists_every_curated_model_with_sizes() -> None:
    cards = catalog(include_embedded=False)
    assert [c.id for c in cards] == list(CURATED_CONFIGS)
    assert len(cards) == 14
    for card in cards:
        assert card.bytes_per_dtype["bfloat16"] == 2 * card.num_parameters
        assert card.bytes_per_dtype["float32"] == 4 * card.num_parameters
        assert set(card.instance_types) == set(InstanceType)
    qwen3 = find_card("qwen/QWEN3-0.6b")  # case-insensitive, as the hub
    assert qwen3 is not None and (qwen3.architecture, qwen3.num_layers, qwen3.context_length) == ("qwen3", 28, 40960)
    assert find_card("nobody/unknown") is None


def _transformers_count(model_type: str, config: dict[str, Any]) -> int:
    import torch
    import transformers

    hf_config = transformers.AutoConfig.for_model(model_type, **config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


@pytest.mark.parametrize("model_type,extra", [
    ("llama", {"tie_word_embeddings": False}),
    ("llama", {"tie_word_embeddings": True}),
    ("mistral", {"tie_word_embeddings": False}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {"tie_word_embeddings": False, "head_dim": 32}),
])
def test_derived_parameter_count_matches_transformers(model_type: str, extra: dict[str, Any]) -> None:
    config = {"model_type": model_type, **TINY, **extra}
    card = card_from_config("test/tiny", config)
    assert card.num_parameters == _transformers_count(model_type, {**TINY, **extra})


def test_stage_sizes_add_up() -> None:
    llama8b = find_card("meta-llama/Llama-3.1-8B-Instruct")
    assert llama8b is not None
    halves = llama8b.stage_bytes(0, 16) + llama8b.stage_bytes(16, 32)
    assert halves == llama8b.stage_bytes(0, 32) == llama8b.weight_bytes("bfloat16")
    assert llama8b.kv_cache_bytes_per_token("bfloat16") == 128 * 1024  # 2 (k, v) x 32 layers x 8 heads x 128
    tied = find_card("meta-llama/Llama-3.2-1B-Instruct")
    assert tied is not None
    # a tied model's last stage loads the embedding again, as its lm_head
    split = tied.stage_bytes(0, 8, "float32") + tied.stage_bytes(8, 16, "float32")
    assert split == tied.weight_bytes("float32") + 4 * tied.embedding_parameters
    with pytest.raises(ValueError, match="outside 0:16"):
        tied.stage_bytes(8, 17)
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        tied.weight_bytes("int3")


def test_card_from_a_repo_config_and_file_sizes(tiny_checkpoint: dict[str, bytes]) -> None:
    import json

    config = json.loads(tiny_checkpoint["config.json"])
    sizes = {name: len(data) for name, data in tiny_checkpoint.items()}
    sizes["consolidated.safetensors"] = 10**9  # the mistral-inference copy: not what we download
    card = card_from_config("ringlet-test/tiny-llama", config, sizes)
    assert card.download_bytes == sum(len(d) for n, d in tiny_checkpoint.items() if n.endswith(".safetensors"))
    assert (card.format, card.num_layers, card.hidden_size, card.context_length) == ("safetensors", 4, 64, 128)

    gguf = card_from_config("someone/x-GGUF", config, {"x.Q4_0.gguf": 1234})
    assert gguf.format == "gguf" and gguf.download_bytes == 1234
    assert set(gguf.instance_types) == set(InstanceType)  # MLX reads GGUF through ringlet's reader


def test_unsupported_architecture_names_the_repo() -> None:
    with pytest.raises(ModelLoadError, match=r"someone/x: architecture 'no_such_arch' is not supported; supported: "
                                             r".*llama"):
        card_from_config("someone/x", {"model_type": "no_such_arch", **TINY})


def test_an_architecture_only_mlx_lm_has_gets_an_mlx_only_card_sized_from_its_files() -> None:
    pytest.importorskip("mlx_lm")
    card = card_from_config("someone/gpt", {"model_type": "gpt2", "torch_dtype": "float16", **TINY},
                            {"model.safetensors": 2 * 10**6})
    assert card.instance_types == [InstanceType.MLX_RING, InstanceType.MLX_JACCL]
    assert (card.architecture, card.num_layers, card.vocab_size, card.download_bytes) == ("gpt2", 3, 100, 2 * 10**6)
    assert card.num_parameters == 10**6  # the weight files' bytes at the config's 2-byte dtype
    assert card.layer_parameters == (10**6 - 64 * 100) // 3  # the rest after the tied embedding, a layer each


@pytest.mark.slow
def test_embedded_card_comes_from_the_gguf_file_and_agrees_with_the_curated_one() -> None:
    card = embedded_card()
    curated = find_card("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert curated is not None
    assert card.source == "embedded" and card.format == "gguf" and card.download_bytes
    assert set(card.instance_types) == set(InstanceType)
    same = ("architecture", "num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "vocab_size", "tie_word_embeddings", "num_parameters", "context_length")
    assert {k: getattr(card, k) for k in same} == {k: getattr(curated, k) for k in same}
    assert find_card("smollm2-135m-instruct") == card


def test_resolve_card_reads_config_and_sizes_from_the_hub(hub: FakeHub, tiny_checkpoint: dict[str, bytes]) -> None:
    card = resolve_card(REPO_ID)
    assert (card.source, card.num_layers, card.architecture) == ("hub", NUM_LAYERS, "llama")
    assert card.download_bytes == sum(len(d) for n, d in tiny_checkpoint.items() if n.endswith(".safetensors"))
    assert ModelStore().get(REPO_ID) is None  # nothing written: a card needs no weights
    download_model(REPO_ID)
    assert resolve_card(REPO_ID).source == "local"


def test_resolve_card_without_the_hub_falls_back_to_the_curated_card(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.stop()
    assert resolve_card("Qwen/Qwen3-0.6B") == find_card("Qwen/Qwen3-0.6B")
    with pytest.raises(HubUnreachable, match=f"cannot reach {hub.url} for nobody/unknown"):
        resolve_card("nobody/unknown")
    with pytest.raises(ModelLoadError, match="offline: nobody/unknown is neither curated nor complete on disk"):
        resolve_card("nobody/unknown", offline=True)


@pytest.mark.parametrize("precision, held_as", [("auto", CPU_STORED_INT4), ("int8", WEIGHT_ONLY_INT8), ("int4", XPU_INT4),
                                               ("bf16", "bfloat16")])
def test_the_card_counts_the_bytes_the_cpu_engine_holds_for_the_embedded_model(precision: str, held_as: str) -> None:
    if not cpu_supports_bf16():
        pytest.skip("the CPU engine quantises only where bf16 is native")
    stage, _ = load_torch_stage(None, precision=precision)
    # a tensor two modules share (the tied int8 embedding and lm_head) counted once, as the memory holds it
    held = sum(t.numel() * t.element_size() for t in [*stage.model.parameters(), *stage.model.buffers()])
    card = embedded_card()
    assert card.stage_bytes(0, card.num_layers, held_as) == pytest.approx(held, rel=0.01)


def test_a_gguf_files_card_is_read_once_and_again_when_the_file_changes(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, arch="llama")
    opened: list[Path] = []
    real_open = loader._open_gguf
    monkeypatch.setattr(loader, "_open_gguf", lambda p: opened.append(p) or real_open(p))

    first = card_from_path("tiny", path)
    assert card_from_path("tiny", path) == first and read_model_config(path)[1].model_type == "llama"
    assert len(opened) == 1

    write_tiny_gguf(path, arch="qwen3", seed=1)  # another model under the same name
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert read_model_config(path)[1].model_type == "qwen3"
    assert len(opened) == 2


def test_a_gguf_cards_quantization_is_the_files_type_else_that_of_most_of_its_weights(tmp_path: Path) -> None:
    import gguf

    assert embedded_card().quantization == "Q4_1"
    typed, untyped = tmp_path / "typed.gguf", tmp_path / "untyped.gguf"
    write_tiny_gguf(typed, metadata=lambda w: w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M))
    write_tiny_gguf(untyped)
    assert card_from_path("typed", typed).quantization == "Q4_K_M"
    counts: dict[str, int] = {}
    for kind, elements in loader.gguf_facts(untyped).tensor_types.values():
        counts[kind] = counts.get(kind, 0) + elements
    assert card_from_path("untyped", untyped).quantization == max(counts, key=lambda k: counts[k])


def test_a_model_named_by_its_path_has_the_card_of_its_files() -> None:
    """As placement counts its bytes: the GGUF's 4-bit share and type, as for the same file by name."""
    from ringlet.models.embedded import embedded_model_path
    from ringlet.models.names import Catalog

    path = embedded_model_path()
    by_path, by_name = Catalog(local_roots=[path]).add_local(str(path)), embedded_card()
    assert by_path.id == str(path.resolve()) and by_path.source == "local"
    assert (by_path.quantization, by_path.four_bit_share, by_path.five_bit_share, by_path.download_bytes) == (
        by_name.quantization, by_name.four_bit_share, by_name.five_bit_share, by_name.download_bytes)
    assert by_path.four_bit_share == 1.0
