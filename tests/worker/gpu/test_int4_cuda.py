"""Weight-only int4 / int8 linears on CUDA: the Triton kernels against the dequantised weight, and the engines running
them (the GPU tests skip cleanly without one; run through the device tool). The first tests run on any machine."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ringlet.models.loader import LoadedStage
from ringlet.models.quant import (
    GroupQuantized,
    Int4Embedding,
    Int8Embedding,
    embed_rows,
    quantize_int8,
    quantize_layer_int4,
)
from ringlet.models.quant_format import read_rows_int4
from ringlet.models.random_checkpoint import random_weights, synthetic_tokenizer
from ringlet.models.registry import build_stage, model_args
from ringlet.shared.config import EngineConfig
from ringlet.shared.tasks import SamplingParams, TextGenerationTask
from ringlet.worker.engines.torch.engine import resolve_precision
from tests.support.gpu import Greedy, assert_tracks, on_gpu
from tests.support.random_models import GPU_CONFIG


def test_int4_and_int8_are_accepted_on_cuda_and_refused_elsewhere():
    assert resolve_precision("int4", torch.device("cuda")) == "int4"
    assert resolve_precision("int8", torch.device("cuda")) == "int8"
    with pytest.raises(ValueError, match="CPUs and CUDA GPUs"):
        resolve_precision("int4", torch.device("xpu"))


def test_the_kernels_module_imports_without_triton_or_a_gpu():
    """Importing the linears and their ops loads no Triton: a CPU machine without it imports them too."""
    code = ("import sys; import ringlet.models.quant_cuda, ringlet.models.kernels.int4_cuda; "
            "print('triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def packed_linear(n: int, k: int, group: int, seed: int = 0):  # type: ignore[no-untyped-def]
    from ringlet.models.quant_cuda import CudaInt4Linear

    g = torch.Generator(device="cuda").manual_seed(seed)
    weight = torch.randn(n, k, device="cuda", generator=g) * 0.02
    return CudaInt4Linear(GroupQuantized.round(weight, group), None, torch.bfloat16), weight


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 3, 16, 100, 512])
@on_gpu
def test_int4_kernel_matches_the_dequantised_weight(rows, group):
    linear, _ = packed_linear(1001, 768, group)
    x = torch.randn(rows, 768, device="cuda", dtype=torch.bfloat16)
    reference = F.linear(x.float(), linear.dequantize())
    out = linear(x)
    assert out.shape == (rows, 1001) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("rows", [1, 3, 16, 100, 512])
@on_gpu
def test_int8_kernel_matches_the_dequantised_weight(rows):
    from ringlet.models.quant_cuda import CudaInt8Linear

    weight = torch.randn(1001, 776, device="cuda") * 0.02
    bias = torch.randn(1001, device="cuda")
    linear = CudaInt8Linear(weight, bias, torch.bfloat16)
    x = torch.randn(rows, 776, device="cuda", dtype=torch.bfloat16)
    reference = F.linear(x.float(), linear.dequantize(), bias.bfloat16().float())
    torch.testing.assert_close(linear(x).float(), reference, atol=2e-2, rtol=2e-2)
    assert (linear.dequantize() - weight).abs().max() <= linear.scale.max() / 2 + 1e-6


@pytest.mark.parametrize(("n", "k", "gated"), [(6144, 4096, False), (4096, 14336, False), (2 * 3584, 4096, True)])
@pytest.mark.parametrize(("ahead", "stages"), [(False, 1), (True, 1), (False, 2), (False, 4)],
                         ids=["in-step", "step-ahead", "2-stages", "4-stages"])
@on_gpu
def test_one_row_tilings_of_a_decode_step_agree(n, k, gated, ahead, stages):
    """A decode step's one-row product at its default tiling for projections shaped as Llama's (gate/up narrower),
    with the weights read in the step, a step ahead into registers or through shared memory 2 or 4 steps deep,
    launched with programmatic dependent launch where the GPU has it: each the dequantised product (x is rounded to
    int8 per block of 32, hence the tolerance)."""
    import dataclasses

    from ringlet.models.kernels import int4_cuda

    linear, _ = packed_linear(n, k, 128, seed=5)
    out_n = n // 2 if gated else n
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    norm = (1 + 0.3 * torch.randn(k, device="cuda")).bfloat16()
    tiling = dataclasses.replace(int4_cuda.gemv_tiling(out_n, k, 128, gated), ahead=ahead, stages=stages)
    out = torch.zeros(1, out_n, device="cuda", dtype=torch.bfloat16)
    pdl = torch.cuda.get_device_capability()[0] >= 9
    int4_cuda._int4_gemv_rows(x, linear.packed, linear.scale, linear.offset, 128, out, out_n, k, None, norm, 1e-5,
                              gated, False, pdl, tiling)
    y = F.linear(F.rms_norm(x.float(), (k,), norm.float(), 1e-5), linear.dequantize())
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    assert (out.float() - y).abs().max() <= 2e-2 * y.abs().max()


@pytest.mark.parametrize("rows", [1, 3, 5, 200])
@pytest.mark.parametrize("kind", ["int4", "int8"])
@on_gpu
def test_fused_options_match_their_eager_composition(kind, rows):
    """RMSNorm of the input, SiLU(gate) * up and the residual add inside the product, as the decode steps use them
    (the dp4a kernels' few rows; at int4 from DENSE_FROM_ROWS rows around cuBLAS's product of the dequantised
    weight)."""
    from ringlet.models.quant_cuda import CudaInt8Linear

    n, k = 600, 512
    if kind == "int4":
        linear, _ = packed_linear(2 * n, k, 128, seed=3)
    else:
        linear = CudaInt8Linear(torch.randn(2 * n, k, device="cuda") * 0.02, None, torch.bfloat16)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    norm = (1 + 0.3 * torch.randn(k, device="cuda")).bfloat16()
    residual = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    out = residual.clone()
    linear.project(x, out, norm=norm, eps=1e-5, gated=True, residual=True)
    normed = F.rms_norm(x.float(), (k,), norm.float(), 1e-5)
    gate, up = F.linear(normed, linear.dequantize()).chunk(2, dim=-1)
    reference = residual.float() + F.silu(gate) * up
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)


@on_gpu
def test_int4_embedding_kernel_looks_up_the_rows_the_eager_lookup_gives():
    table = torch.randn(1000, 1024, device="cuda") * torch.linspace(0.01, 2, 1000, device="cuda")[:, None]
    embedding = Int4Embedding(read_rows_int4(1000, lambda first, end: table[first:end], 1024, "cuda"), torch.bfloat16)
    tokens = torch.tensor([0, 999, 5, 5, 731], device="cuda")
    out = torch.empty(5, 1024, dtype=torch.bfloat16, device="cuda")
    embed_rows(embedding, tokens, out)  # the Triton kernel
    torch.testing.assert_close(out, embedding(tokens), rtol=2**-8, atol=0)  # fp32 to bf16 rounding, once each
    step = embedding.step[tokens].float().repeat_interleave(32, dim=-1)
    assert bool(((out.float() - table[tokens]).abs() <= 0.5 * step + table[tokens].abs() / 128 + 1e-3).all())


@on_gpu
def test_an_int4_load_on_cuda_keeps_the_embedding_in_4_bit_groups(tmp_path):
    from ringlet.worker.engines.torch.engine import load_torch_stage
    from tests.support.quantized_checkpoints import dense_weights, save

    path = save(tmp_path / "model", GPU_CONFIG, dense_weights(GPU_CONFIG))
    stage, precision = load_torch_stage(path, precision="int4", device=torch.device("cuda"))
    assert precision == "int4" and isinstance(stage.model.embed_tokens, Int4Embedding)
    stage, _ = load_torch_stage(path, precision="int8", device=torch.device("cuda"))
    assert isinstance(stage.model.embed_tokens, Int8Embedding)


def quantised_and_reference(kind: str) -> tuple[nn.Module, nn.Module]:
    """A random GPU_CONFIG model quantised as load_stage does on CUDA, and the same model with each linear's
    dequantised weight in bf16 (what the kernels should compute)."""
    from ringlet.models.quant_cuda import CUDA_GROUP_SIZE, CudaInt4Linear, CudaInt8Linear

    args = model_args(GPU_CONFIG)
    weights = random_weights(args, torch.bfloat16, "cuda", seed=1)
    weights["model.embed_tokens.weight"] *= 50  # peaked logits: greedy choices are not near-ties

    def quantise(layer: nn.Module, index: int) -> None:
        if kind == "int4":
            quantize_layer_int4(layer, index, torch.bfloat16, {}, False, CUDA_GROUP_SIZE)
        else:
            quantize_int8(layer, torch.bfloat16)

    model = build_stage(args, weights=dict(weights), dtype=torch.bfloat16, device="cuda", finish_layer=quantise,
                        int8_ends=True, int4_embedding=kind == "int4")
    assert isinstance(model.embed_tokens, Int4Embedding if kind == "int4" else Int8Embedding)
    reference = build_stage(args, weights=dict(weights), dtype=torch.bfloat16, device="cuda")
    reference.embed_tokens.weight.data = model.embed_tokens(torch.arange(args.vocab_size, device="cuda"))
    quantised = dict(model.named_modules())
    for name, module in list(reference.named_modules()):
        if isinstance(module, nn.Linear):
            packed = quantised[name]
            assert isinstance(packed, CudaInt4Linear | CudaInt8Linear), name
            module.weight.data = packed.dequantize().to(torch.bfloat16)
    return model, reference


def stage_of(model: nn.Module) -> LoadedStage:
    args = model_args(GPU_CONFIG)
    return LoadedStage(args, model, synthetic_tokenizer(args.vocab_size), 0, args.num_hidden_layers)


def greedy(engine, n: int = 32) -> Greedy:  # type: ignore[no-untyped-def]
    """Greedy tokens and, at each, the five most likely tokens' log-probabilities."""
    task = TextGenerationTask(prompt=" ".join(f"t{i * 7 % 997}" for i in range(100)), max_tokens=n,
                              ignore_eos=True, sampling=SamplingParams(temperature=0, logprobs=5))
    tokens: list[int] = []
    tops: list[dict[str, float]] = []
    for chunk in engine.generate(task):
        if chunk.token_id is not None:
            tokens.append(chunk.token_id)
        tops.extend({top.token: top.logprob for top in drawn.top} for drawn in chunk.logprobs or [])
    assert len(tops) == len(tokens) == n
    return tokens, tops


@pytest.mark.parametrize("kind", ["int4", "int8"])
@on_gpu
def test_batch_engine_generates_the_dequantised_models_tokens(kind):
    """The batch engine's graphed steps (fused kernels at a batch of one) over int4 / int8 weights track the greedy
    path of the bf16 model holding the dequantised weights (`assert_tracks`)."""
    from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine

    model, reference = quantised_and_reference(kind)
    config = EngineConfig(max_context=1024, max_batch=8, kv_cache_tokens=4096)
    engine = TorchBatchEngine(stage_of(model), torch.device("cuda"), config)
    assert engine.paged_decode is not None and engine.paged_decode.quantized
    engine.warmup()
    assert_tracks(greedy(engine), greedy(TorchBatchEngine(stage_of(reference), torch.device("cuda"), config)))


@pytest.mark.parametrize("step", ["fused", "compiled"])
@on_gpu
def test_static_decoder_runs_int4_under_graphs(step):
    """TorchEngine's CUDA-graphed step over int4 weights, the fused Triton step or the model compiled by
    torch.compile (the custom ops inside): the dequantised model's greedy tokens."""
    from ringlet.worker.engines.torch.engine import TorchEngine

    model, reference = quantised_and_reference("int4")
    config = EngineConfig(max_context=1024, cuda_decode=step)
    engine = TorchEngine(stage_of(model), torch.device("cuda"), config)
    assert engine.decoder is not None and (engine.decoder.fused is not None) == (step == "fused")
    engine.warmup()
    assert_tracks(greedy(engine), greedy(TorchEngine(stage_of(reference), torch.device("cuda"), config,
                                                     cuda_graphs=False)))
