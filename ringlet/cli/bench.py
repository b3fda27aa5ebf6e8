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
from ringlet.cli.run import add_model_options
from ringlet.models.errors import ModelLoadError
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
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=bench)


def make_prompt(tokenizer: Any, n_tokens: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += tokenizer.encode(FILLER, add_special_tokens=False)
    return ids[:n_tokens]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def time_engine(engine: Any, prompt: str, new_tokens: int, repeats: int) -> dict[str, float]:
    task = TextGenerationTask(prompt=prompt, max_tokens=new_tokens, ignore_eos=True,
                              sampling=SamplingParams(temperature=0))
    runs = []
    for i in range(repeats + 1):
        engine.generator.cached = []  # measure a cold prompt each time, not the reused prefix
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


def time_transformers(model_path: Any, prompt_ids: list[int], new_tokens: int, repeats: int) -> dict[str, float]:
    """transformers generate() on the same file (its own GGUF or safetensors loading; fp32, eager)."""
    import torch
    import transformers

    if model_path.is_dir():
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name,
                                                                  dtype=torch.float32)
    model.eval()
    ids = torch.tensor([prompt_ids])
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    decode, ttft = [], []
    with torch.inference_mode():
        for i in range(repeats + 1):
            began = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
            first = time.perf_counter() - began
            began = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            total = time.perf_counter() - began
            if i:
                ttft.append(first)
                decode.append((new_tokens - 1) / max(total - first, 1e-9))
    return {"prompt_tokens": len(prompt_ids), "new_tokens": new_tokens,
            "time_to_first_token_ms": median(ttft) * 1000, "prefill_tokens_per_s": len(prompt_ids) / median(ttft),
            "decode_tokens_per_s": median(decode)}


def bench(args: argparse.Namespace) -> int:
    import torch

    from ringlet.worker.engines.loading import load_local_engine

    try:
        engine = load_local_engine(args.model, args.engine)
    except ModelLoadError as e:
        raise CliError(str(e)) from None
    tokenizer = engine.tokenizer
    ids = make_prompt(tokenizer, args.prompt_tokens)
    prompt = tokenizer.decode(ids, skip_special_tokens=False)
    results: dict[str, Any] = {
        "model": str(args.model or "SmolLM2-135M-Instruct (embedded)"),
        "engine": engine.name,
        "threads": torch.get_num_threads(),
        "ringlet": time_engine(engine, prompt, args.new_tokens, args.repeats),
    }
    results["ringlet"]["peak_memory_mb"] = peak_rss_bytes() / 2**20
    if args.baseline == "transformers":
        from ringlet.models.loader import resolve_model_path

        results["transformers"] = time_transformers(resolve_model_path(args.model), ids, args.new_tokens, args.repeats)
        results["speedup_decode"] = (results["ringlet"]["decode_tokens_per_s"]
                                     / results["transformers"]["decode_tokens_per_s"])
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
        return 0
    print(f"model {results['model']}  engine {results['engine']}  threads {results['threads']}")
    rows = [k for k in ("ringlet", "transformers") if k in results]
    print(f"{'':14}{'prompt':>8}{'new':>6}{'TTFT ms':>10}{'prefill tok/s':>15}{'decode tok/s':>14}{'peak MB':>10}")
    for k in rows:
        r = results[k]
        peak = f"{r['peak_memory_mb']:.0f}" if "peak_memory_mb" in r else "-"
        print(f"{k:14}{r['prompt_tokens']:>8}{r['new_tokens']:>6}{r['time_to_first_token_ms']:>10.1f}"
              f"{r['prefill_tokens_per_s']:>15.1f}{r['decode_tokens_per_s']:>14.1f}{peak:>10}")
    if "speedup_decode" in results:
        print(f"decode speed-up over transformers: {results['speedup_decode']:.2f}x")
    return 0
