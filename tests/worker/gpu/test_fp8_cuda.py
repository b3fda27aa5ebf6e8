"""fp8 checkpoints on a CUDA GPU: with fp8 tensor cores (compute capability 8.9+) the linears keep their fp8 weights
and run `torch._scaled_mm`; on older GPUs they are dequantised to bf16 at load. Skipped cleanly without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ringlet.models.fp8 import Fp8Linear, runs_fp8
from ringlet.models.loader import load_stage
from ringlet.shared.config import EngineConfig
from ringlet.worker.engines.torch.engine import TorchEngine
from tests.support.gpu import assert_tracks, greedy_texts
from tests.support.quantized_checkpoints import FP8, PROMPT, fp8_checkpoints, relative_error

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
fp8_cores = pytest.mark.skipif(not torch.cuda.is_available() or not runs_fp8("cuda"),
                               reason="needs fp8 tensor cores (compute capability 8.9 or later)")


def cuda_logits(path: Path) -> tuple[nn.Module, torch.Tensor]:
    stage = load_stage(path, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        return stage.model, stage.model(PROMPT.cuda(), stage.model.make_cache(1, 64), 0).float().cpu()


@fp8_cores
@pytest.mark.parametrize("case", sorted(FP8))
def test_fp8_linears_run_scaled_mm_and_give_the_dequantised_models_logits(tmp_path: Path, case: str) -> None:
    quantized, dequantized, _ = fp8_checkpoints(tmp_path, case)
    model, ours = cuda_logits(quantized)
    _, reference = cuda_logits(dequantized)
    qkv = model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Fp8Linear) and qkv.weight.dtype == torch.float8_e4m3fn and qkv.per_channel
    assert isinstance(model.layers[0].mlp.down_proj, Fp8Linear)
    assert isinstance(model.lm_head, nn.Linear)  # left out of the quantisation by the checkpoint
    assert relative_error(ours, reference) < 0.05


@pytest.mark.skipif(not torch.cuda.is_available() or runs_fp8("cuda"), reason="needs a GPU without fp8 tensor cores")
def test_older_gpus_dequantise_fp8_at_load(tmp_path: Path) -> None:
    quantized, dequantized, _ = fp8_checkpoints(tmp_path, "compressed-tensors per channel")
    model, ours = cuda_logits(quantized)
    _, reference = cuda_logits(dequantized)
    assert type(model.layers[0].self_attn.qkv_proj) is nn.Linear
    torch.testing.assert_close(ours, reference, atol=1e-2, rtol=1e-2)


@fp8_cores
def test_the_engine_decodes_an_fp8_model_from_cuda_graphs(tmp_path: Path) -> None:
    """The fused Triton step has no fp8 kernel: the compiled step runs the fp8 linears, replayed from CUDA graphs,
    and gives the eager step's tokens."""
    quantized, _, _ = fp8_checkpoints(tmp_path, "compressed-tensors per tensor")

    def greedy(cuda_graphs: bool) -> tuple[list[str], list[dict[str, float]]]:
        stage = load_stage(quantized, dtype=torch.bfloat16, device="cuda")
        engine = TorchEngine(stage, torch.device("cuda"), EngineConfig(max_context=256), cuda_graphs)
        return greedy_texts(engine, "t5 t17 t42 t8 t90", 24)

    graphed = greedy(True)
    # bf16 rounding may part the two paths at a near-tie of this random model: up to there their likeliest tokens
    # and log-probabilities agree
    assert_tracks(graphed, greedy(False))
