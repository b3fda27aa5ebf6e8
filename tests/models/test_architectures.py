"""Every architecture against Hugging Face transformers, through the real safetensors loader."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import transformers

from ringlet.models import safetensors_loader
from ringlet.models.registry import build_stage, model_args
from ringlet.shared.errors import ModelLoadError
from tests.support.random_models import load_checkpoint_stage

TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 256, "rms_norm_eps": 1e-5}

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY, tie_word_embeddings=True, rope_theta=50000.0),
    "llama3-rope": lambda: transformers.LlamaConfig(**TINY, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=24),
}
HF_CLASSES = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
              "qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}


def make_checkpoint(name: str, path: Path) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = CONFIGS[name]()
    model = HF_CLASSES[config.model_type](config).eval()
    with torch.no_grad():  # random biases and norm weights, so that nothing is trivially 0 or 1
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_(1.0 if "norm" in n else 0.0, 0.1)
    model.save_pretrained(path, max_shard_size="100KB")  # several files and an index
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp(request.param)
    return make_checkpoint(request.param, path), path


def test_index_has_several_files(checkpoint):  # type: ignore[no-untyped-def]
    _, path = checkpoint
    assert (path / safetensors_loader.INDEX_FILE).exists()
    assert len(list(path.glob("*.safetensors"))) > 2


@torch.no_grad()
def test_logits_match_transformers_with_cache_batch2(checkpoint):  # type: ignore[no-untyped-def]
    reference, path = checkpoint
    model = load_checkpoint_stage(path)
    torch.manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (2, 11))
    cache = model.make_cache(batch_size=2, max_seq_len=64)
    ours = model(ids, cache, 0)
    theirs = reference(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # 20 decode steps through the cache, each compared with a full recompute by transformers
    seq = ids
    for step in range(20):
        nxt = ours[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        ours = model(nxt, cache, seq.shape[1] - 1)
        torch.testing.assert_close(ours[:, -1], reference(seq).logits[:, -1], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_chunked_prefill_equals_one_pass(checkpoint):  # type: ignore[no-untyped-def]
    _, path = checkpoint
    model = load_checkpoint_stage(path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 23))
    whole = model(ids, model.make_cache(2, 64), 0)
    cache = model.make_cache(2, 64)
    parts = [model(ids[:, a:b], cache, a) for a, b in [(0, 7), (7, 16), (16, 23)]]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("cuts", [[3], [2, 4], [1, 5]])
def test_chained_stages_equal_whole_model(checkpoint, cuts):  # type: ignore[no-untyped-def]
    _, path = checkpoint
    bounds = [0, *cuts, TINY["num_hidden_layers"]]
    stages = [load_checkpoint_stage(path, a, b) for a, b in itertools.pairwise(bounds)]
    whole = load_checkpoint_stage(path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    h: torch.Tensor = ids
    caches = [s.make_cache(2, 32) for s in stages]
    for stage, cache in zip(stages, caches):
        h = stage(h, cache, 0)
    torch.testing.assert_close(h, whole(ids, whole.make_cache(2, 32), 0), atol=1e-5, rtol=1e-5)
    assert stages[0].embed_tokens is not None and stages[0].lm_head is None
    assert stages[-1].embed_tokens is None and stages[-1].lm_head is not None
    assert all(s.embed_tokens is None and s.lm_head is None for s in stages[1:-1])


def test_half_range_reads_only_its_files(tmp_path):  # type: ignore[no-untyped-def]
    make_checkpoint("llama", tmp_path)
    weight_map = safetensors_loader.weight_map(tmp_path)
    first_half = {f for n, f in weight_map.items() if safetensors_loader.tensor_in_range(n, 0, 3, 6, True)}
    for f in set(weight_map.values()) - first_half:  # files only the second half needs: gone
        (tmp_path / f).unlink()
    model = load_checkpoint_stage(tmp_path, 0, 3)
    assert model.num_local_layers == 3
    with pytest.raises(ModelLoadError, match="missing"):
        load_checkpoint_stage(tmp_path, 3, 6)


def test_truncated_safetensors_is_a_clear_error(tmp_path):  # type: ignore[no-untyped-def]
    make_checkpoint("llama", tmp_path)
    victim = min(tmp_path.glob("*.safetensors"))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated|corrupt"):
        load_checkpoint_stage(tmp_path)


def test_unknown_architecture_names_supported_ones():
    with pytest.raises(ModelLoadError, match="llama.*mistral.*qwen2.*qwen3"):
        model_args({**TINY, "model_type": "gpt_neox"})


@pytest.mark.parametrize("method", ["bitsandbytes", "hqq", "eetq", "aqlm", "exl2"])
def test_a_quantised_checkpoint_is_refused_by_its_method_not_read_wrongly(method):
    with pytest.raises(ModelLoadError, match=f"quantised with '{method}' .*use the model's bf16 checkpoint"):
        model_args({**TINY, "model_type": "llama", "quantization_config": {"quant_method": method, "bits": 4}})
    # MLX's own quantised checkpoints name no method: mlx-lm reads them
    assert model_args({**TINY, "model_type": "llama", "quantization_config": {"group_size": 64, "bits": 4}})


def test_bad_layer_range():
    args = model_args({**TINY, "model_type": "llama"})
    with pytest.raises(ModelLoadError, match="layer range"):
        build_stage(args, 4, 9)


@torch.no_grad()
def test_tensor_position_decode_equals_int_position(checkpoint):  # type: ignore[no-untyped-def]
    """The static-shape decode step (CUDA graphs) computes what the dynamic one does."""
    _, path = checkpoint
    model = load_checkpoint_stage(path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    a, b = model.make_cache(2, 64), model.make_cache(2, 64)
    model(ids, a, 0)
    model(ids, b, 0)
    token = torch.randint(0, TINY["vocab_size"], (2, 1))
    dynamic = model(token, a, 9)
    static = model(token, b, torch.tensor([9]), kv_len=32)
    torch.testing.assert_close(static, dynamic, atol=1e-5, rtol=1e-5)
