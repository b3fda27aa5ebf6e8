"""Decode-step time of the graphed CUDA decoder under each compile level (RINGLET_CUDA_COMPILE), one process
per level so inductor's settings do not leak between them.

Usage: python scripts/tune_decode_gpu.py llama-3.2-1b [level[+matmul] ...]   (+matmul: attention as matmuls; +gemv: projections as reductions)
Prints, per level: compile+capture seconds, microseconds per step, steps/s and the fraction of the
bandwidth limit (copy bandwidth measured in the same process ÷ weight bytes).
"""

import json
import os
import subprocess
import sys
import time


def matmul_attention() -> None:
    """Swap SDPA for explicit matmuls + softmax in one-token decode steps (inductor then fuses mask+softmax)."""
    import types

    import torch.nn.functional as F

    from ringlet.models import llama

    def attention(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):  # type: ignore[no-untyped-def]
        if q.shape[2] != 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                  enable_gqa=enable_gqa)
        b, h, _, d = q.shape
        kv = k.shape[1]
        qg = q.view(b, kv, h // kv, d)
        scores = (qg @ k.transpose(-1, -2)).float() * d ** -0.5
        scores = scores.masked_fill(~attn_mask, float("-inf"))
        out = scores.softmax(-1).to(v.dtype) @ v
        return out.view(b, h, 1, d)

    llama.F = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith("_")})
    llama.F.scaled_dot_product_attention = attention


def reduction_gemv() -> None:
    """One-token projections as multiply + sum, which inductor emits as its own (tunable) reduction kernels."""
    import torch
    from torch import nn

    linear = nn.Linear.forward

    def forward(self, x):  # type: ignore[no-untyped-def]
        if x.numel() != x.shape[-1]:
            return linear(self, x)
        out = (x.float().unsqueeze(-2) * self.weight.float()).sum(-1)
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype)

    nn.Linear.forward = forward
    del torch


def measure(shape: str) -> dict:
    import torch

    from ringlet.cli.bench import copy_bandwidth, weight_bytes_per_token
    from ringlet.models.loader import LoadedStage
    from ringlet.models.random_checkpoint import random_weights, shape_config, synthetic_tokenizer
    from ringlet.models.registry import build_stage, model_args
    from ringlet.shared.config import EngineConfig
    from ringlet.worker.engines.torch.engine import TorchEngine

    args = model_args(shape_config(shape))
    weights = random_weights(args, torch.bfloat16, "cuda")
    model = build_stage(args, weights=weights, dtype=torch.bfloat16, device="cuda")
    del weights
    stage = LoadedStage(args, model, synthetic_tokenizer(args.vocab_size), 0, args.num_hidden_layers)
    config = EngineConfig.from_environment(os.environ, max_context=512)  # RINGLET_CUDA_COMPILE, set per process below
    engine = TorchEngine(stage, torch.device("cuda"), config)
    began = time.perf_counter()
    engine.decoder.warm()
    warmup = time.perf_counter() - began
    token = torch.tensor([[5]], device="cuda")
    for i in range(20):
        engine.decoder(token, 128 + i)
    torch.cuda.synchronize()
    steps, began = 256, time.perf_counter()
    for i in range(steps):
        engine.decoder(token, 128 + i)
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - began) / steps
    limit = copy_bandwidth(torch.device("cuda")) / weight_bytes_per_token(model)
    return {"warmup_s": round(warmup, 1), "step_us": round(step_s * 1e6, 1), "steps_per_s": round(1 / step_s, 1),
            "fraction_of_limit": round(1 / step_s / limit, 3), "gpu": torch.cuda.get_device_name()}


if __name__ == "__main__":
    if sys.argv[1] == "--one":
        if os.environ.get("ATTENTION") == "matmul":
            matmul_attention()
        if os.environ.get("GEMV") == "reduction":
            reduction_gemv()
        print(json.dumps(measure(sys.argv[2])))
        sys.exit(0)
    shape, levels = sys.argv[1], sys.argv[2:] or ["default", "tuned", "max-autotune"]
    for choice in levels:
        level, *extras = choice.split("+")
        env = dict(os.environ, RINGLET_CUDA_COMPILE=level, RINGLET_CUDA_DECODE="compiled",
                   TORCHINDUCTOR_CACHE_DIR=f"/tmp/inductor-{choice}",
                   ATTENTION="matmul" if "matmul" in extras else "sdpa",
                   GEMV="reduction" if "gemv" in extras else "cublas")
        out = subprocess.run([sys.executable, __file__, "--one", shape], env=env, capture_output=True, text=True,
                             check=False)
        result = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else out.stderr[-2000:]
        print(f"{shape} {choice}: {result}", flush=True)
