"""`ringlet run PROMPT`: answer one prompt on this machine, streaming, no server needed."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, get_args

from ringlet.cli import CliError, engine_from_environment
from ringlet.shared.config import PRECISIONS, EngineConfig
from ringlet.shared.errors import ContextWindowError, ModelLoadError
from ringlet.shared.instances import BoundInstance, IpexOptimizationLevel
from ringlet.shared.tasks import ChatMessage, SamplingParams, TextGenerationTask

if TYPE_CHECKING:
    from ringlet.worker.engines.base import Engine

IPEX_CPU = "ipex-cpu"  # the ipex engine on IPEX's CPU backend: a --engine of the commands that run a model here


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a Hugging Face model directory, a GGUF file (the first of a split model's), a model "
                             "pulled with `ringlet pull` or with Ollama (llama3.2:1b), or a known name (default: the "
                             "embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--engine", default=engine_from_environment(),
                        help="cpu, cuda, ipex, ipex-cpu (IPEX's CPU backend, where IPEX is installed) or mlx "
                             "(default: $RINGLET_ENGINE, else the best available)")
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="int8 and int4 are weight-only: for CPUs, and on Intel GPUs dequantised in the matmul "
                             "(default: $RINGLET_PRECISION, else auto)")
    parser.add_argument("--ipex-optimization-level", default="auto", choices=get_args(IpexOptimizationLevel),
                        help="the ipex engines' optimisation: IPEX where usable else torch.compile (auto), or only "
                             "ipex, compile or eager (default auto)")
    parser.add_argument("--intel-gpu-devices", default=None, metavar="INDEXES",
                        help="the ipex engine's Intel GPUs, e.g. 0,1: the model runs on the one with room, else "
                             "split over them as a node places it (default: one GPU, the discrete ones first)")


def engine_config(args: argparse.Namespace, **overrides: object) -> EngineConfig:
    """The engine settings of $RINGLET_* with the command's flags over them."""
    try:
        return EngineConfig.from_environment(os.environ, precision=args.precision, **overrides)
    except ValueError as error:
        raise CliError(str(error)) from None


def load_engine(model: str | None, engine: str | None, config: EngineConfig,
                ipex_optimization: IpexOptimizationLevel = "auto", intel_gpu_devices: str | None = None) -> Engine:
    """`model` on this machine with `engine` (or the best available; "ipex-cpu": IPEX's CPU backend; "ipex" with
    `intel_gpu_devices`: placed on them as a node would, split where no one holds it); errors as CliError."""
    from ringlet.models.store import ringlet_home
    from ringlet.shared.messages import LoadShard
    from ringlet.worker.engines.engine_init import initialize_engine, local_instance
    from ringlet.worker.engines.engine_utils import EngineUnavailableError, select_best_engine
    from ringlet.worker.engines.ipex import IPEXEngineError
    from ringlet.worker.engines.torch.static_decode import use_persistent_compile_caches
    from ringlet.worker.runner import stage_weight_bytes

    try:
        if engine == IPEX_CPU:
            from ringlet.worker.engines.ipex.utils_ipex import load_ipex_engine

            with _layer_bar():
                return load_ipex_engine(model, device="cpu", config=config, optimization=ipex_optimization)
        chosen = select_best_engine(engine)
        use_persistent_compile_caches(ringlet_home())
        bound = local_instance(model, chosen, ipex_optimization)
        if intel_gpu_devices is not None:
            if chosen != "ipex":
                raise CliError(f"--intel-gpu-devices is for the ipex engine, not {chosen}; add --engine ipex")
            bound = on_intel_gpus(bound, model, intel_gpu_devices, config)
        with _layer_bar(stage_weight_bytes(LoadShard(bound=bound, config=config))):
            return initialize_engine(bound, config)
    except IPEXEngineError as e:
        raise CliError(f"engine {engine or 'ipex'}: {e}") from None
    except (ModelLoadError, EngineUnavailableError, ValueError) as e:
        raise CliError(str(e)) from None


def on_intel_gpus(bound: BoundInstance, model: str | None, devices: str, config: EngineConfig) -> BoundInstance:
    """`bound` placed on this machine's Intel GPUs `devices` as a node places an IpexRing: on the one with room, else
    split over them (PlacementError, a ValueError, says why it does not fit)."""
    from ringlet.cli.node import instance_options
    from ringlet.master.placement import place
    from ringlet.models.catalog import card_from_path
    from ringlet.models.embedded import EMBEDDED_MODEL_ID
    from ringlet.models.loader import read_model_config
    from ringlet.shared.instances import InstanceType
    from ringlet.shared.state import NodeInfo
    from ringlet.worker.system_info import collect_engine_info, collect_node_hardware, read_memory

    options = instance_options(devices, bound.instance.ipex_optimization_level)
    path, _ = read_model_config(bound.instance.model)
    card = card_from_path(model or EMBEDDED_MODEL_ID, path)
    node = NodeInfo(node_id=bound.node_id, name="this machine", hardware=collect_node_hardware(),
                    engines=collect_engine_info("ipex"), memory=read_memory(), precision=config.precision)
    placed = place(card, InstanceType.IPEX_RING, [node], instance_id=bound.instance.instance_id, options=options,
                   kv_tokens=min(card.context_length, config.max_context))
    instance = placed.instance.model_copy(update={"model": bound.instance.model})
    return BoundInstance(instance=instance, node_id=bound.node_id)


@contextlib.contextmanager
def _layer_bar(bytes_total: int | None = None) -> Iterator[None]:
    """A bar of the layers loaded so far on a terminal's stderr, with the weight bytes they keep (of `bytes_total`,
    what the stage holds when loaded, where known), gone once the model is loaded."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ringlet.models.loader import reporting_load_progress
    from ringlet.shared.sizes import format_bytes, format_bytes_of

    with Progress(TextColumn("loading layers"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("", total=None)

        def show(done: int, total: int, kept: int) -> None:
            held = format_bytes_of(kept, bytes_total) if bytes_total else format_bytes(kept)
            bar.update(task, completed=done, total=total, description=held)

        with reporting_load_progress(show):
            yield


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
    p.add_argument("--stats", action="store_true", help="print tokens/s and time to first token after the answer")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        messages = ([ChatMessage(role="system", content=args.system)] if args.system else [])
        messages.append(ChatMessage(role="user", content=args.prompt))
        task = TextGenerationTask(messages=messages, max_tokens=args.max_tokens, sampling=sampling)
    except ValueError as e:
        raise CliError(str(e)) from None
    engine = load_engine(args.model, args.engine, engine_config(args), args.ipex_optimization_level,
                         args.intel_gpu_devices)
    from ringlet.worker.engines.ipex import IPEXEngineError

    try:
        for chunk in engine.generate(task):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    except (ContextWindowError, ValueError, IPEXEngineError) as e:  # an IPEXMemoryError says what to do
        raise CliError(str(e)) from None
    sys.stdout.write("\n")
    if args.stats and chunk.timings and chunk.usage:
        t = chunk.timings
        print(f"[{engine.name}] prompt {chunk.usage.prompt_tokens} tokens, {chunk.usage.completion_tokens} generated; "
              f"time to first token {t.time_to_first_token_s * 1000:.0f} ms; decode {t.decode_tokens_per_s:.1f} tokens/s",
              file=sys.stderr)
    return 0
