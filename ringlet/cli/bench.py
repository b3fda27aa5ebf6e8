"""`ringlet bench`: prefill and decode speed, time to first token and peak memory of an engine.

With `--baseline transformers`, Hugging Face transformers' `generate()` runs on the same weights in the
same process, so the two numbers come from one machine state.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import Any

from ringlet.cli import CliError
from ringlet.cli.run import add_model_options, engine_config, load_engine
from ringlet.models.shapes import SHAPES
from ringlet.shared.config import DEFAULT_MAX_CONTEXT
from ringlet.shared.errors import ModelLoadError
from ringlet.shared.tasks import SamplingParams, TextGenerationTask

FILLER = ("The quick brown fox jumps over the lazy dog while the river runs past old mills and quiet "
          "farms, and the travellers count the hours until the lights of the city appear. ")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure prefill/decode tokens/s, time to first token, peak memory",
                       description="Benchmark one engine on one model: greedy decoding of a fixed prompt.")
    add_model_options(p)
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; the median is kept")
    p.add_argument("--baseline", choices=["none", "transformers"], default="none",
                   help="also time transformers generate() on the same weights, in the same run")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="instead of --model: random weights shaped like this model (synthetic vocabulary)")
    p.add_argument("--max-context", type=int, default=DEFAULT_MAX_CONTEXT,
                   help=f"the context window (default {DEFAULT_MAX_CONTEXT}); the KV cache holds several such "
                        "windows where the memory does (RINGLET_KV_CACHE_TOKENS sets its positions)")
    p.add_argument("--streams", type=int, nargs="+", default=[], metavar="N",
                   help="also generate N requests at once in the engine's batch (distinct prompts, greedy), for "
                        "each N: aggregate tokens/s, time per decode step, fraction of the step's memory limit")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=bench)


def make_prompt(tokenizer: Any, n_tokens: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += tokenizer.encode(FILLER, add_special_tokens=False)
    return ids[:n_tokens]


def prompt_text(tokenizer: Any, n_tokens: int) -> str:
    """Filler text that a raw prompt encodes to `n_tokens` tokens (special tokens counted, as the engine counts
    them), or to the nearest count below where no cut of the filler gives exactly that: decoding tokens and
    encoding the text again merges some across the filler's repeats."""
    ids = make_prompt(tokenizer, 2 * n_tokens + 16)

    def count(m: int) -> int:
        return len(tokenizer.encode(tokenizer.decode(ids[:m], skip_special_tokens=False), add_special_tokens=True))

    low, high = 0, len(ids)  # the most filler tokens whose text encodes to no more than n_tokens
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if count(middle) <= n_tokens else (low, middle - 1)
    return tokenizer.decode(ids[:low], skip_special_tokens=False)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def xpus_of(engine: Any) -> list[Any]:
    """The Intel GPUs an ipex engine computes on (`XpuDevice`s: one, or each part's of a split model), or none: any
    other engine, or IPEX's CPU backend."""
    from ringlet.worker.engines.ipex.device import XpuDevice

    computes = [getattr(part, "compute", None) for part in getattr(engine, "parts", [engine])]
    return [compute for compute in computes if isinstance(compute, XpuDevice)]


def xpu_peak_bytes(xpu: Any) -> int | None:
    """torch.xpu.max_memory_allocated of the GPU (through its runtime, so a test's fake answers), or None where
    this PyTorch lacks it."""
    query = getattr(xpu.runtime.api, "max_memory_allocated", None)
    return None if query is None else int(query(xpu.index))


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def time_engine(engine: Any, prompt: str, new_tokens: int, repeats: int) -> dict[str, float]:
    task = TextGenerationTask(prompt=prompt, max_tokens=new_tokens, ignore_eos=True,
                              sampling=SamplingParams(temperature=0))
    runs = []
    for i in range(repeats + 1):
        if (generator := getattr(engine, "generator", None)) is not None:
            generator.cached = []  # a cold prompt each time, not the reused prefix (a batching engine's is always cold)
        *_, last = engine.generate(task)
        if i:  # the first run is the warm-up
            runs.append(last)
    timings = [r.timings for r in runs]
    return {
        "prompt_tokens": runs[0].usage.prompt_tokens,
        "new_tokens": runs[0].usage.completion_tokens,
        "time_to_first_token_ms": median([t.time_to_first_token_s for t in timings]) * 1000,
        "prefill_tokens_per_s": median([t.prefill_tokens_per_s for t in timings]),
        "decode_tokens_per_s": median([t.decode_tokens_per_s for t in timings]),
    }


def time_streams(engine: Any, prompts: list[str], new_tokens: int) -> dict[str, float]:
    """Every prompt at once through the engine's batch: aggregate completion tokens/s over the whole run (prefills
    included), time to first token, inter-token latency (the gaps between a stream's tokens), and the decode
    steps that computed every stream at once (none when the first streams finish before the last prompt is in)."""
    from ringlet.worker.batching import BatchGenerator

    generator = BatchGenerator.configured(engine, engine.config)
    for i, prompt in enumerate(prompts):
        generator.submit(TextGenerationTask(task_id=f"stream-{i}", prompt=prompt, max_tokens=new_tokens,
                                            ignore_eos=True, sampling=SamplingParams(temperature=0)))
    began = time.perf_counter()
    last_token: dict[str, float] = {}
    first_token: list[float] = []
    gaps: list[float] = []
    full_steps: list[float] = []
    generated = 0
    slowest = 0.0
    while generator:
        start = time.perf_counter()
        chunks = generator.step()
        now = time.perf_counter()
        slowest = max(slowest, now - start)
        if generator.last_step_tokens == len(prompts):  # every stream decoding, no prompt chunk in the step
            full_steps.append(now - start)
        for chunk in chunks:
            if chunk.task_id in last_token:
                gaps.append(now - last_token[chunk.task_id])
            else:
                first_token.append(now - began)
            last_token[chunk.task_id] = now
            if chunk.usage is not None:
                generated += chunk.usage.completion_tokens
    wall = time.perf_counter() - began
    result = {"streams": len(prompts), "new_tokens": generated, "wall_s": wall,
              "aggregate_tokens_per_s": generated / wall, "full_batch_steps": len(full_steps),
              "slowest_step_ms": slowest * 1000}
    graphed = getattr(engine, "paged_decode", None)
    if graphed is not None:  # the GPU's share of a full step: the rest of decode_step is the host's
        result["graph_replay_ms"] = graphed.replay_ms(len(prompts))
    for name, values in (("time_to_first_token", first_token), ("inter_token", gaps), ("decode_step", full_steps)):
        values.sort()
        for p in (50, 95):
            result[f"{name}_p{p}_ms"] = values[min(len(values) - 1, len(values) * p // 100)] * 1000 if values else float("nan")
    result["decode_tokens_per_s"] = len(prompts) / (result["decode_step_p50_ms"] / 1000)
    return result


def kv_bytes_per_position(model: Any) -> int:
    """Bytes of keys and values one cached position holds over all of a stage's layers."""
    args = model.args
    element = next(model.parameters()).element_size()
    return 2 * model.num_local_layers * args.num_key_value_heads * args.head_dim * element


def stream_prompts(tokenizer: Any, n_tokens: int, streams: int) -> list[str]:
    """`streams` prompts of about `n_tokens` tokens, each opening with 8 tokens of its own, drawn from the middle of
    the vocabulary (words any tokenizer has, a synthetic word-level one too): no prefix is shared, so none is reused
    from the cache."""
    ids, vocab = make_prompt(tokenizer, n_tokens), tokenizer.vocab_size
    return [tokenizer.decode([vocab // 4 + (8 * i + k) % (vocab // 2) for k in range(8)] + ids[8:],
                             skip_special_tokens=False) for i in range(streams)]


def transformers_model(model_path: Any, weights: dict[str, Any] | None, config: dict[str, Any] | None,
                       dtype: Any, device: Any) -> Any:
    """transformers' own loading of the same file, or its model of the shape's architecture over the same random
    tensors."""
    import torch
    import transformers

    if weights is not None:
        assert config is not None
        settings = {k: v for k, v in config.items() if k != "model_type"}
        hf_config = transformers.AutoConfig.for_model(config["model_type"], **settings, dtype=dtype)
        with torch.device(device):  # random init, replaced by the shared tensors below
            model = transformers.AutoModelForCausalLM.from_config(hf_config).to(dtype)
        missing = model.load_state_dict(weights, assign=True, strict=False).missing_keys
        model.tie_weights()
        if [name for name in missing if name != "lm_head.weight"]:
            raise RuntimeError(f"transformers' {config['model_type']} model has weights the random ones lack: "
                               f"{missing[:3]}")
    elif model_path.is_dir():
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name,
                                                                  dtype=dtype)
    return model.to(device).eval()


def time_transformers(model: Any, prompt_ids: list[int], new_tokens: int, repeats: int) -> dict[str, float]:
    """transformers generate(), greedy, eager, its default cache."""
    import torch

    def sync() -> None:
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    device = model.device
    ids = torch.tensor([prompt_ids], device=device)
    kwargs = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    decode, ttft = [], []
    with torch.inference_mode():
        for i in range(repeats + 1):
            sync()
            began = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
            sync()
            first = time.perf_counter() - began
            began = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            sync()
            total = time.perf_counter() - began
            if i:
                ttft.append(first)
                decode.append((new_tokens - 1) / max(total - first, 1e-9))
    return {"prompt_tokens": len(prompt_ids), "new_tokens": new_tokens,
            "time_to_first_token_ms": median(ttft) * 1000, "prefill_tokens_per_s": len(prompt_ids) / median(ttft),
            "decode_tokens_per_s": median(decode)}


def copy_bandwidth(device: Any, nbytes: int = 1 << 30) -> float:
    """Device memory bandwidth in bytes/s from a large copy (bytes read + bytes written)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize()
    began, n = time.perf_counter(), 20
    for _ in range(n):
        dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * nbytes * n / (time.perf_counter() - began)


def cuda_graph_seconds(calls: list[Any]) -> float:
    """Seconds of one of `calls` (callables of no argument), from a CUDA graph of all of them replayed: the best of
    five replays, after one unmeasured."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up runs (compilation, workspaces) off the capturing stream
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best / len(calls)


def weight_bytes_per_token(model: Any) -> int:
    """Bytes one decode step of one sequence reads: every weight, except an untied embedding table (one row is read)
    and the experts a token does not choose (a sparse layer reads top_k of its num_experts)."""
    tied = model.lm_head is not None and model.embed_tokens is not None and (
        getattr(model.lm_head, "weight", None) is getattr(model.embed_tokens, "weight", False))
    args = model.args
    total = 0
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("embed_tokens") and not tied:
            continue
        size = tensor.numel() * tensor.element_size()
        total += size * args.num_experts_per_tok // args.num_experts if ".experts." in name else size
    return total


def load_bench_engine(args: argparse.Namespace) -> tuple[Any, dict[str, Any] | None, dict[str, Any] | None]:
    """(engine, random weights or None, their config or None)."""
    import torch

    from ringlet.models.loader import LoadedStage
    from ringlet.models.quant import COMPUTE_DTYPES
    from ringlet.models.random_checkpoint import random_weights, shape_config, synthetic_tokenizer
    from ringlet.models.registry import build_stage, model_args
    from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine
    from ringlet.worker.engines.torch.engine import resolve_precision

    settings = engine_config(args, max_context=args.max_context)
    if args.shape is None:
        return load_engine(args.model, args.engine, settings, args.ipex_optimization_level,
                           args.intel_gpu_devices), None, None
    if args.engine not in (None, "cpu", "cuda"):
        raise CliError(f"--shape builds the torch engine on cpu or cuda, not {args.engine}; use --model for it")
    device = torch.device(args.engine or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = resolve_precision(settings.precision, device)
    if precision in ("int8", "int4") and device.type != "cuda":
        raise CliError("--shape quantises on CUDA GPUs only; use --precision bf16 (or --model) on a CPU")
    config = shape_config(args.shape)
    model_arguments = model_args(config)
    dtype = COMPUTE_DTYPES[precision]
    weights: dict[str, Any] | None = random_weights(model_arguments, dtype, device)
    quantized = precision in ("int8", "int4")
    model = build_stage(model_arguments, weights=weights, dtype=dtype, device=device,
                        finish_layer=quantizer(precision, dtype), int8_ends=quantized,  # as load_stage builds it
                        int4_embedding=precision == "int4")
    if quantized and args.baseline == "none":  # the float weights go: the peak below is the quantised instance's
        weights = None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    stage = LoadedStage(model_arguments, model, synthetic_tokenizer(model_arguments.vocab_size), 0,
                        model_arguments.num_hidden_layers)
    engine = TorchBatchEngine(stage, device, settings)
    engine.precision = precision
    return engine, weights, config


def quantizer(precision: str, dtype: Any) -> Any:
    """What load_stage does to each layer as it loads at `precision`: int4 groups of CUDA_GROUP_SIZE, or int8."""
    from ringlet.models.quant import quantize_int8, quantize_layer_int4
    from ringlet.models.quant_cuda import CUDA_GROUP_SIZE

    if precision == "int4":
        return lambda layer, index: quantize_layer_int4(layer, index, dtype, {}, False, CUDA_GROUP_SIZE)
    if precision == "int8":
        return lambda layer, index: quantize_int8(layer, dtype)
    return None


def bench(args: argparse.Namespace) -> int:
    from ringlet.worker.engines.ipex import IPEXEngineError

    try:
        engine, weights, config = load_bench_engine(args)
    except (ModelLoadError, ValueError) as e:
        raise CliError(str(e)) from None
    try:
        return report(args, engine, weights, config)
    except IPEXEngineError as e:  # an Intel GPU out of memory mid-run: the message says what to do
        raise CliError(f"engine {engine.name}: {e}") from None


def report(args: argparse.Namespace, engine: Any, weights: dict[str, Any] | None, config: dict[str, Any] | None
           ) -> int:
    """Warm `engine` up, time it as `args` ask, and print the results."""
    import torch

    from ringlet.worker.engines.engine_init import warmup_engine
    from ringlet.worker.runner import running_engine

    warmup_s = warmup_engine(engine)
    tokenizer = engine.tokenizer
    prompt = prompt_text(tokenizer, args.prompt_tokens)
    device, xpus = engine.device, xpus_of(engine)
    results: dict[str, Any] = {
        "model": args.shape and f"random weights shaped like {args.shape}" or str(args.model or "SmolLM2-135M-Instruct (embedded)"),
        "engine": running_engine(engine, "cpu"), "device": ", ".join(xpu.name for xpu in xpus) if xpus else (
            torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "precision": engine.precision, "threads": torch.get_num_threads(), "warmup_s": warmup_s,
        "ringlet": time_engine(engine, prompt, args.new_tokens, args.repeats),
    }
    if optimization := getattr(engine, "optimization", None):
        results["optimization"] = optimization
    if xpus:  # the devices' memory, not the host's: the weights and the cache live there
        peaks = [xpu_peak_bytes(xpu) for xpu in xpus]
        if None not in peaks:
            results["ringlet"]["peak_memory_mb"] = sum(peaks) / 2**20  # type: ignore[arg-type]
            if len(peaks) > 1:
                results["ringlet"]["peak_memory_mb_per_device"] = [peak / 2**20 for peak in peaks]  # type: ignore[operator]
    elif device.type == "cuda":
        results["ringlet"]["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        bandwidth = copy_bandwidth(device)
        weight_bytes = weight_bytes_per_token(engine.stage.model)
        results |= {"copy_bandwidth_gb_s": bandwidth / 1e9, "weight_gb": weight_bytes / 1e9,
                    "limit_tokens_per_s": bandwidth / weight_bytes}
        results["ringlet"]["fraction_of_limit"] = results["ringlet"]["decode_tokens_per_s"] / results["limit_tokens_per_s"]
    else:
        results["ringlet"]["peak_memory_mb"] = peak_rss_bytes() / 2**20
    streams = []
    for n in args.streams:
        if n > engine.config.max_batch:
            raise CliError(f"--streams {n} is more than the engine batches ({engine.config.max_batch}); "
                           f"set RINGLET_MAX_BATCH={n}")
        result = time_streams(engine, stream_prompts(tokenizer, args.prompt_tokens, n), args.new_tokens)
        if "copy_bandwidth_gb_s" in results:  # a step reads every weight once and each stream's cache
            context = args.prompt_tokens + args.new_tokens / 2
            step_bytes = results["weight_gb"] * 1e9 + n * context * kv_bytes_per_position(engine.stage.model)
            result["fraction_of_limit"] = (step_bytes / (results["copy_bandwidth_gb_s"] * 1e9)) / (
                result["decode_step_p50_ms"] / 1000)
        streams.append(result)
    if streams:
        results["streams"] = streams
    if args.baseline == "transformers":
        from ringlet.models.loader import resolve_model_path

        path = None if weights is not None else resolve_model_path(args.model)
        dtype = torch.float32 if engine.precision in ("fp32", "int8") and device.type == "cpu" else next(
            engine.stage.model.parameters()).dtype
        reference = transformers_model(path, weights, config, dtype, device)
        ids = tokenizer.encode(prompt, add_special_tokens=True)  # the tokens the engine was given
        results["transformers"] = time_transformers(reference, ids, args.new_tokens, args.repeats)
        if "limit_tokens_per_s" in results:
            results["transformers"]["fraction_of_limit"] = (results["transformers"]["decode_tokens_per_s"]
                                                            / results["limit_tokens_per_s"])
        results["speedup_decode"] = (results["ringlet"]["decode_tokens_per_s"]
                                     / results["transformers"]["decode_tokens_per_s"])
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
        return 0
    print(f"model {results['model']}  engine {results['engine']}  device {results['device']}  "
          f"precision {results['precision']}  threads {results['threads']}  warm-up {warmup_s:.1f} s")
    if "optimization" in results:
        print(f"optimisation {results['optimization']}")
    if "limit_tokens_per_s" in results:
        print(f"copy bandwidth {results['copy_bandwidth_gb_s']:.0f} GB/s, weights {results['weight_gb']:.2f} GB, "
              f"limit {results['limit_tokens_per_s']:.0f} tokens/s")
    rows = [k for k in ("ringlet", "transformers") if k in results]
    print(f"{'':14}{'prompt':>8}{'new':>6}{'TTFT ms':>10}{'prefill tok/s':>15}{'decode tok/s':>14}"
          f"{'of limit':>10}{'peak MB':>10}")
    for k in rows:
        r = results[k]
        peak = f"{r['peak_memory_mb']:.0f}" if "peak_memory_mb" in r else "-"
        frac = f"{r['fraction_of_limit']:.0%}" if "fraction_of_limit" in r else "-"
        print(f"{k:14}{r['prompt_tokens']:>8}{r['new_tokens']:>6}{r['time_to_first_token_ms']:>10.1f}"
              f"{r['prefill_tokens_per_s']:>15.1f}{r['decode_tokens_per_s']:>14.1f}{frac:>10}{peak:>10}")
    if "speedup_decode" in results:
        print(f"decode speed-up over transformers: {results['speedup_decode']:.2f}x")
    if streams:
        print(f"\n{'streams':>8}{'tok/s':>10}{'TTFT p50':>10}{'p95 ms':>8}{'ITL p50':>9}{'p95 ms':>8}"
              f"{'full steps':>11}{'step p50 ms':>12}{'graph ms':>9}{'slowest ms':>11}{'decode tok/s':>14}{'of limit':>10}")
        for r in streams:
            frac = f"{r['fraction_of_limit']:.0%}" if "fraction_of_limit" in r else "-"
            print(f"{r['streams']:>8}{r['aggregate_tokens_per_s']:>10.1f}{r['time_to_first_token_p50_ms']:>10.0f}"
                  f"{r['time_to_first_token_p95_ms']:>8.0f}{r['inter_token_p50_ms']:>9.2f}{r['inter_token_p95_ms']:>8.2f}"
                  f"{r['full_batch_steps']:>11}{r['decode_step_p50_ms']:>12.2f}{r.get('graph_replay_ms', float('nan')):>9.2f}"
                  f"{r['slowest_step_ms']:>11.0f}{r['decode_tokens_per_s']:>14.1f}{frac:>10}")
    return 0
