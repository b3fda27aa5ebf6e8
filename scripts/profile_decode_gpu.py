"""Where one CUDA decode step spends its time, kernel by kernel (random weights shaped like a known model).

Usage: python scripts/profile_decode_gpu.py llama-3.2-1b [--max-context 1024] [--position 256]

Replays the engine's decode graph, times the replays, then profiles 20 of them and prints each kernel role's mean time
per call and, for the projections (the fused step's order: q/k/v, o, gate/up, down a layer, then lm_head), the
bandwidth it reached. Set RINGLET_CUDA_DECODE=compiled for the torch.compile'd step (its kernels are listed by name).
"""

import argparse
import collections
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ringlet.cli.bench import copy_bandwidth, weight_bytes_per_token
from ringlet.models.loader import LoadedStage
from ringlet.models.random_checkpoint import random_weights, shape_config, synthetic_tokenizer
from ringlet.models.registry import build_stage, model_args
from ringlet.shared.config import EngineConfig
from ringlet.worker.engines.torch.engine import TorchEngine

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("shape")
parser.add_argument("--max-context", type=int, default=1024)
parser.add_argument("--position", type=int, default=256)
options = parser.parse_args()

args = model_args(shape_config(options.shape))
weights = random_weights(args, torch.bfloat16, "cuda")
model = build_stage(args, weights=weights, dtype=torch.bfloat16, device="cuda")
del weights
engine = TorchEngine(LoadedStage(args, model, synthetic_tokenizer(args.vocab_size), 0, args.num_hidden_layers),
                     torch.device("cuda"), EngineConfig.from_environment(os.environ, max_context=options.max_context))
began = time.perf_counter()
engine.decoder.warm()
print(f"warm-up {time.perf_counter() - began:.1f} s")
token = torch.tensor([[5]], device="cuda")
for i in range(10):
    engine.decoder(token, options.position + i)
torch.cuda.synchronize()
began = time.perf_counter()
for i in range(200):
    engine.decoder(token, options.position + i % 32)
torch.cuda.synchronize()
step = (time.perf_counter() - began) / 200
bandwidth = copy_bandwidth(torch.device("cuda"))
weight_bytes = weight_bytes_per_token(model)
print(f"step {step * 1e6:.0f} us ({1 / step:.0f} steps/s); copy bandwidth {bandwidth / 1e9:.0f} GB/s; "
      f"limit {bandwidth / weight_bytes:.0f} steps/s -> {weight_bytes / bandwidth / step:.0%}")

steps = 20
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for i in range(steps):
        engine.decoder(token, options.position + i)
    torch.cuda.synchronize()
kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                 key=lambda e: e.time_range.start)
roles = ["q/k/v", "o", "gate/up", "down"]
projection_bytes = {}
layer0 = model.layers[0]
for role, linear in zip(roles, (layer0.self_attn.qkv_proj, layer0.self_attn.o_proj, layer0.mlp.gate_up_proj,
                                layer0.mlp.down_proj)):
    projection_bytes[role] = linear.weight.numel() * linear.weight.element_size()
projection_bytes["lm_head"] = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
per_step = collections.defaultdict(float)
calls = collections.Counter()
index = 0
for event in kernels:
    name = event.name
    if name == "_projection":
        k = index % (4 * len(model.layers) + 1)
        role = roles[k % 4] if k < 4 * len(model.layers) else "lm_head"
        index += 1
        name = f"projection {role}"
    elif len(name) > 60:
        name = name[:57] + "..."
    per_step[name] += event.time_range.elapsed_us() / steps
    calls[name] += 1
total = sum(per_step.values())
print(f"{'kernel':<62}{'calls/step':>11}{'us/step':>10}{'us/call':>9}{'GB/s':>8}")
for name, us in sorted(per_step.items(), key=lambda item: -item[1]):
    per_call = calls[name] / steps
    role = name.removeprefix("projection ")
    rate = f"{projection_bytes[role] / (us / per_call) / 1e3:.0f}" if role in projection_bytes else ""
    print(f"{name:<62}{per_call:>11.0f}{us:>10.1f}{us / per_call:>9.2f}{rate:>8}")
print(f"{'all kernels':<62}{sum(calls.values()) / steps:>11.0f}{total:>10.1f}   (graph replay {step * 1e6:.0f} us)")
