"""GGUF files of each block type loaded at int4 on CUDA: the logits against the bf16 model holding the dequantised
weights (and, where the file's 4-bit groups are kept, against the model built from gguf.quants' values), and the batch
engine's graphed steps against that bf16 model (skip without a GPU; run through the device tool)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from torch import nn

from ringlet.models import gguf_quants
from ringlet.models.loader import LoadedStage
from ringlet.models.registry import build_stage
from ringlet.shared.config import EngineConfig
from tests.support.gguf_models import DECODED, LINEARS, TOLERANCE, relative_error, write_model
from tests.support.gpu import greedy_texts, on_gpu

IDS = [1, 50, 9, 200, 33, 7]
Greedy = tuple[list[str], list[dict[str, float]]]  # as test_int4_cuda's, the tokens by their text


def logits(model: nn.Module, device: str) -> torch.Tensor:
    ids = torch.tensor([IDS], device=device)
    with torch.inference_mode():
        return model(ids, model.make_cache(1, 16), 0).float().cpu()  # type: ignore[operator]


def greedy(engine) -> Greedy:  # type: ignore[no-untyped-def]
    """`greedy_texts` of a prompt that fits the files' context of 256."""
    return greedy_texts(engine, " ".join(f"t{i * 7 % 97}" for i in range(20)), 24)


def assert_tracks(got: Greedy, expected: Greedy, atol: float) -> None:
    """`test_int4_cuda.assert_tracks` over the tokens' texts: up to the first drawn token that differs, the log-
    probabilities of the texts both list agree within `atol`; where the tokens differ, the reference's two likeliest
    (of those listed) are within 2 * `atol`, a near-tie."""
    (tokens, tops), (ref_tokens, ref_tops) = got, expected
    same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens, strict=True)) if a != b), len(tokens))
    for step in range(min(same + 1, len(tokens))):
        for text in tops[step].keys() & ref_tops[step].keys():
            assert abs(tops[step][text] - ref_tops[step][text]) <= atol, (step, text, tops[step], ref_tops[step])
    if same < len(tokens) and len(ref_tops[same]) > 1:
        ranked = sorted(ref_tops[same].values(), reverse=True)
        assert ranked[0] - ranked[1] <= 2 * atol, (same, ranked)


def dequantised(stage: LoadedStage, weights: dict[str, torch.Tensor]) -> nn.Module:
    """The stage's model in bf16 with each quantised linear's dequantised weight: what the kernels should compute."""
    from ringlet.models.quant_cuda import CudaInt4Linear, CudaInt8Linear

    reference = build_stage(stage.args, weights=dict(weights), dtype=torch.bfloat16, device="cuda")
    vocab = torch.arange(stage.args.vocab_size, device="cuda")
    reference.embed_tokens.weight.data = stage.model.embed_tokens(vocab).to(torch.bfloat16)
    quantised = dict(stage.model.named_modules())
    for name, module in list(reference.named_modules()):
        if isinstance(module, nn.Linear):
            packed = quantised[name]
            assert isinstance(packed, CudaInt4Linear | CudaInt8Linear), (name, type(packed))
            module.weight.data = packed.dequantize().to(torch.bfloat16)
    return reference


@pytest.mark.parametrize("qtype", DECODED)
@on_gpu
def test_a_gguf_file_of_each_type_runs_at_int4_on_cuda(qtype: Q, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A file with 4-bit linears keeps them (groups of 32) and its embedding in int8, stored in 8 bits; any other is
    rounded to 4 bits as int4 asks, the linears in groups of 128 and the embedding in groups of 32."""
    from ringlet.models.quant import Int4Embedding, Int8Embedding
    from ringlet.models.quant_cuda import CudaInt4Linear
    from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine
    from ringlet.worker.engines.torch.engine import load_torch_stage

    monkeypatch.setenv("RINGLET_HOME", str(tmp_path / "home"))
    path = tmp_path / f"{qtype.name}.gguf"
    weights = write_model(path, dict.fromkeys(LINEARS, qtype))
    stage, precision = load_torch_stage(path, precision="int4", device=torch.device("cuda"))
    kept = qtype in gguf_quants.GROUPED_TYPES
    qkv = stage.model.layers[0].self_attn.qkv_proj  # type: ignore[index, union-attr]
    assert precision == "int4" and isinstance(qkv, CudaInt4Linear), type(qkv)
    assert qkv.group_size == (32 if kept else 128)
    assert isinstance(stage.model.embed_tokens, Int8Embedding if kept else Int4Embedding)
    reference = dequantised(stage, weights)
    got = logits(stage.model, "cuda")
    # bf16 activations, rounded to int8 per block of 32 for the products
    assert relative_error(got, logits(reference, "cuda")) < 0.05
    if kept:  # the file's own values, nothing rounded again
        assert relative_error(got, logits(build_stage(stage.args, weights=weights), "cpu")) < 2 * TOLERANCE[qtype]

    config = EngineConfig(max_context=256, max_batch=4, kv_cache_tokens=1024)
    engine = TorchBatchEngine(stage, torch.device("cuda"), config)
    assert engine.paged_decode is not None and engine.paged_decode.quantized
    engine.warmup()
    held = LoadedStage(stage.args, reference, stage.tokenizer, 0, stage.args.num_hidden_layers)
    # this small model's log-probabilities are nearly flat (-3.5 to -4.3 for its likeliest tokens), and rounding x to
    # int8 per block of 32 moves them by up to 0.09 (an H100, every type)
    assert_tracks(greedy(engine), greedy(TorchBatchEngine(held, torch.device("cuda"), config)), atol=0.1)
