"""The CUDA decode step's int4 expert kernels (`expert_kernels.moe_decode` over `CudaInt4Experts`), run by Triton's
interpreter on CPU tensors, against each chosen expert's dequantised weights in fp32. On a GPU,
tests/worker/gpu/test_cuda_moe.py runs them compiled and graphed through the engine."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from ringlet.models.config import ModelArgs
from ringlet.models.moe import SparseMoE
from ringlet.models.quant_cuda import CudaInt4Experts
from ringlet.models.quant_format import GroupQuantized

pytest.importorskip("triton", reason="Triton comes with CUDA builds of torch; scripts/test.sh installs it for these tests")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="a GPU machine: tests/worker/gpu runs these kernels compiled")


def int4_layer(hidden: int, width: int, experts: int, top_k: int, group: int) -> tuple[SparseMoE, list, list]:
    """A bf16 sparse layer whose experts are int4 (`CudaInt4Experts`), and each expert's gate/up and down groups."""
    args = ModelArgs("qwen3_moe", hidden, 4 * hidden, 1, 1, 1, 64, head_dim=hidden, num_experts=experts,
                     num_experts_per_tok=top_k, moe_intermediate_size=width, norm_topk_prob=True)
    torch.manual_seed(hidden + width)
    moe = SparseMoE(args)
    moe.router.data *= 50  # routers that choose: the experts' outputs differ
    gate_ups = [GroupQuantized.round(w, group) for w in moe.experts.gate_up_proj.data]
    downs = [GroupQuantized.round(w, group) for w in moe.experts.down_proj.data]
    moe.experts = CudaInt4Experts(iter(gate_ups), iter(downs), experts, torch.bfloat16)
    return moe.to(torch.bfloat16), gate_ups, downs


@torch.inference_mode()
@pytest.mark.parametrize(("hidden", "width", "group", "rows"), [
    (256, 384, 128, 1),  # the down kernel's BLOCK_K halved to 128 (384 inputs)
    (512, 256, 128, 3),  # several rows, several programs of rows
    (128, 96, 32, 2),  # GGUF's groups of 32
])
def test_int4_experts_give_the_dequantised_experts_sum(hidden, width, group, rows):
    kernels = importlib.import_module("ringlet.worker.engines.torch.expert_kernels")
    moe, gate_ups, downs = int4_layer(hidden, width, experts=6, top_k=3, group=group)
    assert moe.experts.gate_up_packed.shape == (6, 2 * width, hidden // 2)
    normed = torch.randn(rows, hidden).to(torch.bfloat16)
    start = torch.randn(rows, hidden).to(torch.bfloat16)
    hidden_states = start.clone()
    kernels.moe_decode(moe, normed, hidden_states, kernels.ExpertBuffers(moe, rows, torch.bfloat16, normed.device))

    chosen, weights = moe.route(normed)
    want = start.float()
    for r in range(rows):
        for expert, weight in zip(chosen[r].tolist(), weights[r].float()):
            gate, up = (normed[r].float() @ gate_ups[expert].dequantize().t()).chunk(2)
            want[r] += weight * (F.silu(gate) * up) @ downs[expert].dequantize().t()
    torch.testing.assert_close(hidden_states.float(), want, rtol=0.03, atol=0.03 * (want - start.float()).abs().max())
    assert (hidden_states.float() - start.float()).abs().max() > 0.1 * (want - start.float()).abs().max()


def test_experts_pack_each_experts_codes_in_the_int4_linears_layout():
    """Expert e's slice of the stacks is what `CudaInt4Linear` packs from that expert's groups alone."""
    from ringlet.models.quant_cuda import CudaInt4Linear

    _, gate_ups, downs = int4_layer(128, 64, experts=3, top_k=2, group=32)
    experts = CudaInt4Experts(iter(gate_ups), iter(downs), 3, torch.bfloat16)
    for e in range(3):
        for name, groups in (("gate_up", gate_ups[e]), ("down", downs[e])):
            linear = CudaInt4Linear(groups, None, torch.bfloat16)
            for part in ("packed", "scale", "offset"):
                assert torch.equal(getattr(experts, f"{name}_{part}")[e], getattr(linear, part)), (e, name, part)
