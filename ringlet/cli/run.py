"""`ringlet run PROMPT`: answer one prompt on this machine, streaming, no server needed."""

from __future__ import annotations

import argparse
import sys

from ringlet.cli import CliError
from ringlet.models.errors import ContextWindowError, ModelLoadError
from ringlet.shared.tasks import ChatMessage, SamplingParams, TextGenerationTask


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a Hugging Face model directory, a .gguf file, or a known name (default: the embedded "
                             "SmolLM2-135M-Instruct)")
    parser.add_argument("--engine", default=None,
                        help="cpu, cuda, ipex or mlx (default: the best available; or set RINGLET_ENGINE)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="answer one prompt locally, streaming the reply",
                       description="Answer one prompt on this machine with a chat model, streaming the reply.")
    p.add_argument("prompt", help="what to ask")
    add_model_options(p)
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16", "int8", "int4"),
                   help="int8 and int4 are weight-only, for CPUs (default: auto)")
    p.add_argument("--stats", action="store_true", help="print tokens/s and time to first token after the answer")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ringlet.worker.engines.engine_utils import EngineUnavailableError  # imports torch: not at start-up

    from ringlet.worker.engines.loading import load_local_engine

    try:
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        messages = ([ChatMessage(role="system", content=args.system)] if args.system else [])
        messages.append(ChatMessage(role="user", content=args.prompt))
        task = TextGenerationTask(messages=messages, max_tokens=args.max_tokens, sampling=sampling)
    except ValueError as e:
        raise CliError(str(e)) from None
    try:
        engine = load_local_engine(args.model, args.engine, precision=args.precision)
        for chunk in engine.generate(task):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    except (ModelLoadError, ContextWindowError, EngineUnavailableError, ValueError) as e:
        raise CliError(str(e)) from None
    sys.stdout.write("\n")
    if args.stats and chunk.timings and chunk.usage:
        t = chunk.timings
        print(f"[{engine.name}] prompt {chunk.usage.prompt_tokens} tokens, {chunk.usage.completion_tokens} generated; "
              f"time to first token {t.time_to_first_token_s * 1000:.0f} ms; decode {t.decode_tokens_per_s:.1f} tokens/s",
              file=sys.stderr)
    return 0
