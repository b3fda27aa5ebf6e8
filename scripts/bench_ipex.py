"""IPEX's CPU backend against the CPU engine (the seed's "IPEX vs Torch CPU" benchmark).

Both engines run in one process of the IPEX environment (torch 2.8 + IPEX 2.8), on the same model and
prompt, measured like `ringlet bench` (a cold prompt, greedy, the median of timed runs), and in
alternation, so a busy machine slows both alike. scripts/bench_ipex.sh runs it on the embedded model
and on a random-weight checkpoint shaped like Llama-3.2-1B.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from ringlet.cli.bench import median, peak_rss_bytes, prompt_text
from ringlet.shared.config import EngineConfig
from ringlet.shared.tasks import SamplingParams, TextGenerationTask, Timings

# Llama-3.2-1B's config.json, less its weights
LLAMA_3_2_1B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "max_position_embeddings": 131072, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}


def write_random_llama_1b(directory: Path) -> Path:
    """A Hugging Face directory with random bf16 weights of Llama-3.2-1B's shape and the embedded model's
    tokenizer (its ids, < 49152, all fall inside the 128256-row embedding)."""
    from safetensors.torch import save_file

    from ringlet.models.loader import load_stage

    if (directory / "model.safetensors").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    c = LLAMA_3_2_1B
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    weights = {"model.embed_tokens.weight": rand(c["vocab_size"], h), "model.norm.weight": torch.ones(h).bfloat16()}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        weights.update({
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
            p + "mlp.down_proj.weight": rand(h, i),
            p + "input_layernorm.weight": torch.ones(h).bfloat16(),
            p + "post_attention_layernorm.weight": torch.ones(h).bfloat16(),
        })
    save_file(weights, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(LLAMA_3_2_1B, indent=2))
    tokenizer = load_stage(None, start=0, end=1).tokenizer  # only the first layer: we want the tokenizer
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": tokenizer.chat_template}))
    return directory


def rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


@dataclass
class Loaded:
    engine: object
    load_s: float
    load_rss_bytes: int  # what the process's resident memory grew by while loading it: weights and KV cache


def load(engine_name: str, model: str | None, precision: str) -> Loaded:
    """The CPU engine, or the ipex engine on IPEX's CPU backend, loaded eagerly (no compiled decode step); both
    batch as a node's do, here with a batch of one and a cache of a few sequences."""
    from ringlet.worker.engines.ipex.utils_ipex import load_ipex_engine
    from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine

    config = EngineConfig(precision=precision, cpu_compile=False, kv_cache_tokens=4096)  # type: ignore[arg-type]
    gc.collect()
    began, rss = time.perf_counter(), rss_bytes()
    engine = (load_ipex_engine(model, device="cpu", config=config, optimization="ipex") if engine_name == "ipex"
              else TorchBatchEngine.load(model, config=config))
    return Loaded(engine, time.perf_counter() - began, rss_bytes() - rss)


@dataclass
class Sample:
    timings: Timings  # wall clock, from the stream's last chunk
    decode_cpu_s: float  # this process's CPU time for the decode steps


def run_once(engine, task: TextGenerationTask, first_token_only: TextGenerationTask) -> Sample:  # type: ignore[no-untyped-def]
    """One cold greedy run (each run's batch starts with an empty prefix cache). CPU time of the decode steps: a full run's less a prefill-only run's."""
    cpu = []
    last = None
    for t in (first_token_only, task):
        began = time.process_time()
        *_, last = engine.generate(t)
        cpu.append(time.process_time() - began)
    assert last is not None and last.timings is not None and last.usage is not None
    assert last.usage.completion_tokens == task.max_tokens
    return Sample(last.timings, cpu[1] - cpu[0])


def bench_pair(model: str | None, precision: str, args: argparse.Namespace) -> list[dict[str, object]]:
    """The cpu and ipex engines at one precision, loaded together and run in alternation, so that whatever
    else the machine does falls on both alike; the first round is a warm-up."""
    engines = {name: load(name, model, precision) for name in ("cpu", "ipex")}
    tokenizer = engines["cpu"].engine.tokenizer  # type: ignore[attr-defined]
    prompt = prompt_text(tokenizer, args.prompt_tokens)
    task = TextGenerationTask(prompt=prompt, max_tokens=args.new_tokens, ignore_eos=True,
                              sampling=SamplingParams(temperature=0))
    prefill_only = task.model_copy(update={"max_tokens": 1})
    samples: dict[str, list[Sample]] = {name: [] for name in engines}
    for round_ in range(args.rounds + 1):
        for name, loaded in engines.items():
            sample = run_once(loaded.engine, task, prefill_only)
            if round_:
                samples[name].append(sample)
    results = []
    for name, loaded in engines.items():
        runs, engine = samples[name], loaded.engine
        results.append({
            "engine": name, "precision": precision, "load_s": round(loaded.load_s, 1),
            "load_rss_mb": loaded.load_rss_bytes / 2**20,
            # the process's peak so far: both engines of the pair, and the pairs before, are in it
            "peak_rss_mb": peak_rss_bytes() / 2**20,
            "ttft_ms": median([r.timings.time_to_first_token_s for r in runs]) * 1000,
            "prefill_tokens_per_s": median([r.timings.prefill_tokens_per_s for r in runs]),
            "decode_tokens_per_s": median([r.timings.decode_tokens_per_s for r in runs]),
            "decode_tokens_per_cpu_s": median([(args.new_tokens - 1) / r.decode_cpu_s for r in runs]),
            "optimization": getattr(engine, "optimization", getattr(engine, "precision", "-")),
        })
        engine.close()  # type: ignore[attr-defined]
    del engines
    gc.collect()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="embedded", help="'embedded', 'llama-3.2-1b-random', or a model path")
    parser.add_argument("--precisions", default="fp32,bf16,int8", help="each runs the cpu and the ipex engine")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each engine after a warm-up round")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default). On a shared machine use 1: then CPU time per "
                             "token is what the engine costs, free of other processes and of idle spinning")
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "ringlet-bench")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model: str | None = None
    if args.model == "llama-3.2-1b-random":
        model = str(write_random_llama_1b(args.cache_dir / "llama-3.2-1b-random"))
    elif args.model != "embedded":
        model = args.model
    print(f"model {args.model}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"load average {os.getloadavg()[0]:.1f}  prompt {args.prompt_tokens}  new {args.new_tokens}", flush=True)
    print(f"{'engine':6}{'precision':>10}{'load s':>8}{'TTFT ms':>10}{'prefill tok/s':>15}{'decode tok/s':>14}"
          f"{'decode tok/CPU-s':>18}{'load MB':>9}{'peak RSS MB':>13}  optimisation", flush=True)
    results = []
    for precision in args.precisions.split(","):
        for r in bench_pair(model, precision, args):
            results.append(r)
            print(f"{r['engine']:6}{r['precision']:>10}{r['load_s']:>8}{r['ttft_ms']:>10.0f}"
                  f"{r['prefill_tokens_per_s']:>15.1f}{r['decode_tokens_per_s']:>14.2f}{r['decode_tokens_per_cpu_s']:>18.2f}"
                  f"{r['load_rss_mb']:>9.0f}{r['peak_rss_mb']:>13.0f}  {r['optimization']}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print("json " + json.dumps({"model": args.model, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
