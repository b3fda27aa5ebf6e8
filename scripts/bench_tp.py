"""Decode speed of one model split over the GPUs of one host: tensor parallelism (`models/tensor_parallel.py`) at each
degree, beside the same GPUs as pipeline stages (one step in flight: each stage waits for the one before).

Random weights shaped like a real model (decode speed depends on shapes and bytes, not values), bf16, over NCCL with
NVLink multicast (NVLS) off; or, with `--device cpu`, a tiny shape over gloo on loopback, to check the script runs.
Each configuration starts its own processes (one per GPU). A step's tokens are the greedy picks of the step before.
Tensor parallelism runs the step a node serves (`--step paged`, the default on CUDA): each rank's paged decode step
(`paged_decode.PagedDecodeStep`), its graphs replayed with the all-reduces captured in them, the next step fed the
picks on the device; `--step static` (the default on a CPU) runs the model's own static-cache step instead, as the
pipeline stages do, captured as a CUDA graph unless `--eager`.

Usage: python scripts/bench_tp.py --shape llama-3.1-8b [--degrees 1 2 4] [--batches 1 32] [--pipeline]
       python scripts/bench_tp.py --device cpu
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ringlet.models.config import ModelArgs
from ringlet.models.llama import Transformer
from ringlet.models.registry import build_stage, model_args
from ringlet.models.shapes import LLAMA3_ROPE, SHAPES
from ringlet.models.tensor_parallel import check_shardable, load_sharded_stage
from ringlet.models.weights import LazyWeights, RowReader
from ringlet.shared.errors import ModelLoadError

BENCH_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": SHAPES["llama-3.1-8b"],
    "llama-3.1-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                      "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
                      "tie_word_embeddings": False, "rope_theta": 500000.0, "max_position_embeddings": 131072},
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
             "num_key_value_heads": 4, "vocab_size": 1024, "tie_word_embeddings": False, "rope_theta": 500000.0,
             "max_position_embeddings": 4096},
}


def shape_args(shape: str) -> ModelArgs:
    return model_args({"model_type": "llama", "rms_norm_eps": 1e-5, "rope_scaling": LLAMA3_ROPE,
                       **BENCH_SHAPES[shape]})


def random_weights(args: ModelArgs, start: int, end: int, device: torch.device) -> LazyWeights:
    """Layers [start, end)'s tensors (and the ends a stage there needs), each made when it is read, the same on every
    rank (seeded by its name); the embedding and lm_head a slice of rows at a time."""
    h, i, d = args.hidden_size, args.intermediate_size, args.head_dim
    q, kv = args.num_attention_heads * d, args.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {}
    for n in range(start, end):
        p = f"model.layers.{n}."
        shapes |= {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    if end == args.num_hidden_layers:
        shapes["model.norm.weight"] = (h,)
    ends = ["model.embed_tokens.weight"] if start == 0 else []
    ends += ["lm_head.weight"] if end == args.num_hidden_layers else []

    def make(name: str, shape: tuple[int, ...], salt: int = 0) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape, device=device)
        g = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()) + salt)
        return torch.randn(shape, generator=g, device=device) * 0.02

    def rows(name: str, first: int, end: int) -> torch.Tensor:
        return make(name, (end - first, h), first)

    readers = {name: functools.partial(make, name, shape) for name, shape in shapes.items()}
    readers |= {name: functools.partial(make, name, (args.vocab_size, h)) for name in ends}
    row_readers = {name: RowReader(args.vocab_size, h, functools.partial(rows, name)) for name in ends}
    return LazyWeights(readers, row_readers)


def weight_bytes(args: ModelArgs, element: int) -> int:
    h, i, d = args.hidden_size, args.intermediate_size, args.head_dim
    layer = h * d * (2 * args.num_attention_heads + 2 * args.num_key_value_heads) + 3 * h * i
    return element * (args.num_hidden_layers * layer + 2 * args.vocab_size * h)


def worker(rank: int, world: int, options: dict[str, Any], store_file: str, result_file: str) -> None:
    device = torch.device("cuda", rank) if options["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.FileStore(store_file, world),
                            rank=rank, world_size=world, timeout=timedelta(seconds=600),
                            device_id=device if device.type == "cuda" else None)
    args = shape_args(options["shape"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipeline = options["mode"] == "pipeline"
    per_stage = -(-args.num_hidden_layers // world)
    start, end = (rank * per_stage, min((rank + 1) * per_stage, args.num_hidden_layers)) if pipeline else (
        0, args.num_hidden_layers)
    weights = random_weights(args, start, end, device)
    with torch.inference_mode():
        if pipeline or world == 1:
            model = build_stage(args, start, end, weights=weights, dtype=dtype, device=device)
        else:
            model = load_sharded_stage(args, start, end, weights, dist.group.WORLD, dtype, device)
        del weights
        paged = options["step"] == "paged" and not pipeline
        results = [(paged_decode_speed if paged else decode_speed)(cast(Transformer, model), batch, options, rank,
                                                                   world, pipeline)
                   for batch in options["batches"]]
    if rank == 0:
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        Path(result_file).write_text(json.dumps({"results": results, "peak_gib_rank0": memory}))
    dist.barrier()
    dist.destroy_process_group()


def decode_speed(stage: Transformer, batch: int, options: dict[str, Any], rank: int, world: int,
                 pipeline: bool) -> dict[str, Any]:
    """Prefill `batch` prompts, then time decode steps of all of them at once. A pipeline stage takes its input from
    the stage before and hands its output on; the last one's greedy picks go back to the first."""
    device = next(stage.parameters()).device
    prompt, steps, warmup = options["prompt_tokens"], options["steps"], 3
    kv_len = prompt + 2 * warmup + steps + 8
    cache = stage.make_cache(batch, kv_len)
    dtype = next(stage.parameters()).dtype
    first, last = not pipeline or rank == 0, not pipeline or rank == world - 1

    def forward(x: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        out = stage(x, cache, start, last_logits_only=True, kv_len=kv_len if isinstance(start, torch.Tensor) else None)
        return out.argmax(-1) if stage.is_last else out

    def exchange(compute: Any, tokens: torch.Tensor, length: int) -> torch.Tensor:
        """One step through the ring: the next tokens [B, 1] on the first stage (on every rank without a pipeline)."""
        x = tokens if first else torch.empty(batch, length, stage.args.hidden_size, dtype=dtype, device=device)
        if not first:
            dist.recv(x, rank - 1)
        y = compute(x)
        if not last:
            dist.send(y.contiguous(), rank + 1)
        if pipeline and world > 1 and (first or last):
            if last:
                dist.send(y.contiguous(), 0)
            else:
                y = torch.empty(batch, 1, dtype=torch.long, device=device)
                dist.recv(y, world - 1)
        return y

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    ids = torch.randint(stage.args.vocab_size, (batch, prompt), device=device,
                        generator=torch.Generator(device=device).manual_seed(batch))
    tokens = exchange(lambda x: forward(x, 0), ids, prompt)
    graphed = device.type == "cuda" and not options["eager"]
    position = torch.tensor([prompt], device=device) if graphed else prompt
    if graphed:  # the stage's step with static shapes, replayed on static buffers
        stage.prepare_positions(kv_len)
        static_in = (tokens.clone() if first else
                     torch.zeros(batch, 1, stage.args.hidden_size, dtype=dtype, device=device))
        side = torch.cuda.Stream(device)  # eager first, on a side stream as the capture will run: NCCL, cuBLAS and
        side.wait_stream(torch.cuda.current_stream(device))  # the kernels set up outside the capture
        with torch.cuda.stream(side):
            for _ in range(warmup):
                forward(static_in, position)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = forward(static_in, position)

        def compute(x: torch.Tensor) -> torch.Tensor:
            static_in.copy_(x)
            graph.replay()
            return static_out
    else:
        def compute(x: torch.Tensor) -> torch.Tensor:
            return forward(x, position)

    def decode(count: int) -> None:
        nonlocal tokens, position
        for _ in range(count):
            tokens = exchange(compute, tokens, 1)
            position += 1  # in place where it is the graph's tensor

    decode(warmup)
    sync()
    dist.barrier()
    began = time.perf_counter()
    decode(steps)
    sync()
    elapsed = time.perf_counter() - began
    return {"batch": batch, "step_ms": 1000 * elapsed / steps, "tokens_per_s": batch * steps / elapsed,
            "graphed": graphed}


def paged_decode_speed(stage: Transformer, batch: int, options: dict[str, Any], rank: int, world: int,
                       pipeline: bool) -> dict[str, Any]:
    """Prefill `batch` prompts into a paged cache (eagerly), then time the served decode step over all of them: the
    rank's `PagedDecodeStep`, each step fed the previous one's picks on the device (`FED`)."""
    from ringlet.models.paged_cache import FED, BatchLayout, SequenceStep
    from ringlet.worker.engines.torch.paged_decode import PagedDecodeStep

    device = next(stage.parameters()).device
    prompt, steps, warmup, block = options["prompt_tokens"], options["steps"], 3, 16
    context = -(-(prompt + warmup + steps + 1) // block) * block
    per_sequence = context // block
    cache = stage.make_paged_cache(batch * per_sequence + 1, block)
    tables = [list(range(b * per_sequence, (b + 1) * per_sequence)) for b in range(batch)]
    step = PagedDecodeStep(stage, cache, context, max_batch=batch)
    ids = torch.randint(stage.args.vocab_size, (batch * prompt,), generator=torch.Generator().manual_seed(batch))
    for b in range(batch):  # one prompt at a time: the eager step's attention groups are per sequence anyway
        layout = BatchLayout.build([SequenceStep(0, prompt, tables[b])], block, device, cache.pad_slot)
        stage.forward_batch(ids[b * prompt:(b + 1) * prompt].to(device), cache, layout)
    if device.type == "cuda":
        step.warm()
    tokens = torch.zeros(batch, dtype=torch.long)
    position = prompt

    def decode(count: int) -> None:
        nonlocal tokens, position
        for _ in range(count):
            step(tokens, [SequenceStep(position, 1, table) for table in tables])
            tokens, position = torch.full((batch,), FED), position + 1

    decode(warmup)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    began = time.perf_counter()
    decode(steps)
    if step.last_picks is not None:
        step.last_picks.tokens()  # waits for the last step
    elapsed = time.perf_counter() - began
    return {"batch": batch, "step_ms": 1000 * elapsed / steps, "tokens_per_s": batch * steps / elapsed,
            "graphed": step.graphed}


def run(mode: str, degree: int, options: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        store, result = str(Path(folder) / "store"), str(Path(folder) / "result.json")
        mp.spawn(worker, args=(degree, options | {"mode": mode}, store, result), nprocs=degree, join=True)
        return dict(json.loads(Path(result).read_text()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--shape", choices=sorted(BENCH_SHAPES), default=None,
                        help="default: llama-3.1-8b on cuda, tiny on cpu")
    parser.add_argument("--degrees", type=int, nargs="+", default=None,
                        help="tensor-parallel degrees (and pipeline stage counts); default 1 2 4 8 as GPUs allow, "
                             "1 2 on cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps")
    parser.add_argument("--pipeline", action="store_true", help="also run the same devices as pipeline stages")
    parser.add_argument("--eager", action="store_true", help="--step static without a CUDA graph: every step "
                                                               "launched from Python")
    parser.add_argument("--step", choices=["paged", "static"], default=None,
                        help="tensor parallelism's decode step: the served paged one (default on CUDA; on a CPU its "
                             "Triton kernels run interpreted, TRITON_INTERPRET=1) or the static-cache one")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    # inherited by the ranks: never NVLink multicast; one host, so NCCL's and gloo's sockets on loopback only
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    shape = options.shape or ("tiny" if options.device == "cpu" else "llama-3.1-8b")
    if options.device == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA GPU here; run with --device cpu", file=sys.stderr)
            return 1
        devices = torch.cuda.device_count()
        capacity = min(torch.cuda.get_device_properties(i).total_memory for i in range(devices))
        wanted = options.degrees or [1, 2, 4, 8]
    else:  # processes share the cores: any degree runs, slower
        wanted = options.degrees or [1, 2]
        devices, capacity = max(wanted), None
    args = shape_args(shape)
    total = weight_bytes(args, 2 if options.device == "cuda" else 4)
    skipped: list[str] = []
    plans: list[tuple[str, int]] = []
    for degree in wanted:
        modes = ["tensor"] + (["pipeline"] if options.pipeline and degree > 1 else [])
        if degree > devices:
            skipped += [f"{mode} x{degree}: {devices} {options.device} device(s) here" for mode in modes]
            continue
        if capacity is not None and total / degree > 0.85 * capacity:
            skipped += [f"{mode} x{degree}: {total / degree / 2**30:.0f} GiB of weights a GPU of "
                        f"{capacity / 2**30:.0f} GiB" for mode in modes]
            continue
        try:
            check_shardable(args, degree)
        except ModelLoadError as e:
            skipped.append(f"tensor x{degree}: {e}")
            modes.remove("tensor")
        plans += [(mode, degree) for mode in modes]
    step = options.step or ("paged" if options.device == "cuda" else "static")
    if step == "paged" and options.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # the ranks inherit it
    common = {"device": options.device, "shape": shape, "batches": options.batches, "eager": options.eager,
              "step": step,
              "prompt_tokens": options.prompt_tokens, "steps": options.steps}
    rows = []
    for mode, degree in plans:
        outcome = run(mode, degree, common)
        rows += [{"mode": mode, "degree": degree, "peak_gib_rank0": outcome["peak_gib_rank0"], **result}
                 for result in outcome["results"]]
    gpu = torch.cuda.get_device_name(0) if options.device == "cuda" else "cpu"
    if options.json:
        json.dump({"shape": shape, "device": gpu, "rows": rows, "skipped": skipped}, sys.stdout, indent=2)
        print()
        return 0
    print(f"{shape} ({total / 1e9:.1f} GB of weights) on {gpu}, NCCL_NVLS_ENABLE=0; tensor parallelism on the "
          f"{step} step")
    print(f"{'mode':>10}{'devices':>9}{'batch':>7}{'step ms':>10}{'tok/s':>11}{'graph':>7}{'peak GiB':>10}")
    for row in rows:
        peak = f"{row['peak_gib_rank0']:.1f}" if row["peak_gib_rank0"] is not None else "-"
        print(f"{row['mode']:>10}{row['degree']:>9}{row['batch']:>7}{row['step_ms']:>10.2f}"
              f"{row['tokens_per_s']:>11.1f}{'yes' if row['graphed'] else 'no':>7}{peak:>10}")
    for reason in skipped:
        print(f"skipped {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
