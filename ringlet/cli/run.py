"""`ringlet run [MODEL] [PROMPT]`: answer a prompt, or chat, streaming: on a running node when one answers (which
loads the model on first use and keeps it), else in this process, no server needed."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, get_args

from ringlet.cli import CliError, engine_from_environment
from ringlet.shared.config import PRECISIONS, EngineConfig
from ringlet.shared.errors import ContextWindowError, ModelLoadError
from ringlet.shared.instances import BoundInstance, IpexOptimizationLevel
from ringlet.shared.sizes import format_bytes_of
from ringlet.shared.tasks import ChatMessage, SamplingParams, TextGenerationTask

if TYPE_CHECKING:
    from ringlet.cli.client import NodeClient
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


RUN_DESCRIPTION = (
    "Run MODEL and answer PROMPT, streaming; without a prompt, chat with it (a prompt piped in on stdin is read "
    "whole). A first argument with spaces is the prompt, for --model or the embedded SmolLM2-135M-Instruct. With a "
    "node answering at --url (default http://localhost:52415) the model runs there, loaded on first use and kept "
    "loaded; otherwise here, in this process. A Hugging Face ORG/NAME not on disk yet is pulled first.")
CHAT_HELP = 'type a message; """ starts and ends one of several lines; /clear forgets the conversation; /bye quits'


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="chat with a model, or answer a prompt, streaming", description=RUN_DESCRIPTION)
    p.add_argument("words", nargs="*", metavar="[MODEL] [PROMPT]",
                   help="the model (a name, ORG/NAME, a path, an Ollama name), then the prompt")
    add_model_options(p)
    p.add_argument("--url", default=None, help="the node to run on (default: http://localhost:52415 when a node "
                                               "answers there)")
    p.add_argument("--local", action="store_true", help="run in this process even when a node answers")
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stats", action="store_true", help="print tokens/s and time to first token after the answer")
    p.set_defaults(func=run)


def model_and_prompt(words: list[str], model: str | None) -> tuple[str | None, str | None]:
    """(the model, the prompt) of `ringlet run`'s arguments: the first is the model, unless --model names it or the
    first has spaces (then every argument is the prompt)."""
    if model is not None or not words or any(c.isspace() for c in words[0]):
        return model, " ".join(words) or None
    return words[0], " ".join(words[1:]) or None


class Session(Protocol):
    """Where `ringlet run` generates: `reply(messages)` streams the answer's text; `stats`: the last reply's
    statistics, with --stats."""

    stats: str | None

    def reply(self, messages: list[ChatMessage]) -> Iterator[str]: ...


class LocalSession:
    def __init__(self, args: argparse.Namespace, model: str | None, sampling: SamplingParams) -> None:
        _pull_if_missing(model)
        self.engine = load_engine(model, args.engine, engine_config(args), args.ipex_optimization_level,
                                  args.intel_gpu_devices)
        self.args, self.sampling = args, sampling
        self.stats: str | None = None  # the last reply's, with --stats

    def reply(self, messages: list[ChatMessage]) -> Iterator[str]:
        from ringlet.worker.engines.ipex import IPEXEngineError
        from ringlet.worker.runner import running_engine

        try:
            task = TextGenerationTask(messages=messages, max_tokens=self.args.max_tokens, sampling=self.sampling)
            chunk = None
            for chunk in self.engine.generate(task):
                yield chunk.text
        except (ContextWindowError, ValueError, IPEXEngineError) as e:  # an IPEXMemoryError says what to do
            raise CliError(str(e)) from None
        if self.args.stats and chunk is not None and chunk.timings and chunk.usage:
            usage = chunk.usage
            self.stats = _stats(running_engine(self.engine, "cpu"), usage.prompt_tokens, usage.completion_tokens,
                                chunk.timings.time_to_first_token_s, chunk.timings.decode_tokens_per_s)


class NodeSession:
    """A running node's Ollama API: it loads the model on first use and keeps it loaded. Loading (and pulling a model
    the node lacks) shows the node's progress on stderr."""

    def __init__(self, client: NodeClient, model: str | None, args: argparse.Namespace) -> None:
        self.client, self.args = client, args
        self.stats: str | None = None  # the last reply's, with --stats
        from ringlet.cli.chat import ready_model
        from ringlet.models.embedded import EMBEDDED_MODEL_ID

        self.model = model or ready_model(client) or EMBEDDED_MODEL_ID  # loaded below where nothing is ready
        self.options = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                        "num_predict": args.max_tokens, **({"seed": args.seed} if args.seed is not None else {})}
        self._load()

    def reply(self, messages: list[ChatMessage]) -> Iterator[str]:
        from ringlet.cli.client import NodeApiError

        body = {"model": self.model, "messages": [{"role": m.role, "content": m.content} for m in messages],
                "options": self.options}
        try:
            last: dict[str, Any] = {}
            for line in self.client.stream_lines("/api/chat", body):
                last = line
                yield line.get("message", {}).get("content", "")
        except NodeApiError as error:
            raise CliError(str(error)) from None
        if self.args.stats and last.get("eval_count"):
            decode = last["eval_count"] / max(last.get("eval_duration", 0) / 1e9, 1e-9)
            self.stats = _stats(f"node {self.client.url}", last.get("prompt_eval_count", 0), last["eval_count"],
                                last.get("prompt_eval_duration", 0) / 1e9, decode)

    def _load(self) -> None:
        """Have the node load the model (Ollama's empty prompt), pulling it there first when the node lacks a
        Hugging Face repo or an Ollama library name; errors as CliError."""
        from ringlet.cli.client import NodeApiError

        try:
            try:
                self._load_showing_progress()
            except NodeApiError as error:
                if not (_pullable(self.model) and str(error).startswith(("404", "503"))):
                    raise
                self._pull()
                self._load_showing_progress()
        except NodeApiError as error:
            raise CliError(str(error)) from None

    def _load_showing_progress(self) -> None:
        """Ask the node to load the model and, until it answers, show what its /state says of the load."""
        import threading

        from ringlet.cli.client import NodeApiError

        shown = self.client.get_json("/api/show", {"model": self.model})
        model_id = str(shown.get("model_info", {}).get("general.name", self.model))
        outcome: dict[str, Any] = {}

        def load() -> None:
            try:
                self.client.get_json("/api/generate", {"model": self.model, "prompt": "", "stream": False})
            except NodeApiError as error:
                outcome["error"] = error

        loading = threading.Thread(target=load, name="load", daemon=True)
        loading.start()
        with _status_line() as show:
            while loading.is_alive():
                loading.join(LOAD_POLL_S)
                if loading.is_alive():
                    show(load_progress(self.client.get("/state", timeout_s=10), model_id))
        if "error" in outcome:
            raise outcome["error"]

    def _pull(self) -> None:
        print(f"pulling {self.model} on the node at {self.client.url}", file=sys.stderr)
        with _status_line() as show:
            for line in self.client.stream_lines("/api/pull", {"model": self.model}):
                if line.get("total"):
                    show(f"pulling {self.model}: {format_bytes_of(line.get('completed', 0), line['total'])}")


LOAD_POLL_S = 0.25  # how often `ringlet run` reads a loading node's /state


def load_progress(state: dict[str, Any], model_id: str) -> str:
    """What a node's /state says of `model_id` coming in: its downloads' bytes, its instance's layers loaded."""
    from ringlet.cli.ps import loading_status

    repo = model_id.split(":")[0].lower()
    parts = [f"downloading {d['model']}: {format_bytes_of(d['done'], d['total'])}"
             for d in state.get("downloads", {}).values()
             if d["state"] == "running" and d["model"].split(":")[0].lower() == repo and d.get("total")]
    records = [r for r in state.get("instances", {}).values() if r["instance"]["model"] == model_id]
    if records and records[0]["status"] == "loading":
        parts.append(f"{model_id}: {loading_status(records[0])}")
    return "; ".join(parts) or f"{model_id}: waiting for the node"


@contextlib.contextmanager
def _status_line() -> Iterator[Callable[[str], None]]:
    """`show(text)` rewrites one line on a terminal's stderr, cleared at the end; nothing when stderr is no
    terminal."""
    if not sys.stderr.isatty():
        yield lambda text: None
        return
    from rich.console import Console
    from rich.markup import escape

    with Console(stderr=True).status("") as status:
        yield lambda text: status.update(escape(text))  # a bar's [###...] is text, not markup


def _pullable(model: str) -> bool:
    """Whether a node can pull `model`: a Hugging Face ORG/NAME[:QUANT], or an Ollama library name ringlet maps."""
    from ringlet.models.ollama import library_model
    from ringlet.models.store import ModelRef

    if library_model(model) is not None:
        return True
    try:
        ModelRef.parse(model)
    except ModelLoadError:
        return False
    return True


def _stats(where: str, prompt: int, generated: int, first_token_s: float, decode_tps: float) -> str:
    return (f"[{where}] prompt {prompt} tokens, {generated} generated; time to first token "
            f"{first_token_s * 1000:.0f} ms; decode {decode_tps:.1f} tokens/s")


def _print_stats(session: Session) -> None:
    """The last reply's statistics (--stats) on stderr, once the answer's line is ended."""
    if session.stats is not None:
        sys.stdout.flush()
        print(session.stats, file=sys.stderr)
        session.stats = None


def _pull_if_missing(model: str | None) -> None:
    """A Hugging Face ORG/NAME or an Ollama library name (`qwen3:8b`) that this machine does not hold is pulled into
    the store first."""
    from ringlet.models.loader import resolve_model_path

    if model is None or not _pullable(model):
        return  # not a name a hub has: loading says what it is not
    from ringlet.cli.models import pull

    try:
        resolve_model_path(model)  # here already: a local path, in the store, pulled with Ollama, or a copy's name
    except ModelLoadError:
        print(f"{model} is not on this machine; pulling it", file=sys.stderr)
        if pull(model) != 0:
            raise CliError(f"{model} could not be pulled; `ringlet pull {model}` says why") from None


def _session(args: argparse.Namespace, model: str | None, sampling: SamplingParams) -> Session:
    from ringlet.cli.client import DEFAULT_URL, NodeApiError, NodeClient

    # how this process loads a model: a node loads at its own settings, so these run here unless a node is named
    own = [flag for flag, given in (("--precision", args.precision is not None),
                                    ("--engine", args.engine not in (None, engine_from_environment())))
           if given]
    if own and args.url is not None and not args.local:
        raise CliError(f"{' and '.join(own)} choose how this process loads a model; the node at {args.url} loads at "
                       "its own (`ringlet node --precision/--engine`): leave them out, or run here with --local")
    if not args.local and not own:
        client = NodeClient(args.url or DEFAULT_URL)
        try:
            client.get("/health", timeout_s=1.0)
        except NodeApiError:
            if args.url is not None:
                raise CliError(f"no ringlet node answers at {args.url}; start one with `ringlet node`") from None
        else:
            try:
                return NodeSession(client, model, args)
            except NodeApiError as error:
                raise CliError(str(error)) from None
    return LocalSession(args, model, sampling)


def _read_message() -> str | None:
    """One message from the terminal: a line, or the lines between two triple quotes; None at the end of input."""
    try:
        line = input(">>> ")
    except EOFError:
        return None
    if not line.lstrip().startswith('"""'):
        return line
    text = line.lstrip()[3:]
    while not text.rstrip().endswith('"""'):
        try:
            text += "\n" + input("... ")
        except EOFError:
            break
    return text.rstrip().removesuffix('"""')


def _converse(session: Session, system: str | None) -> int:
    history = [ChatMessage(role="system", content=system)] if system else []
    print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            text = _read_message()
        except KeyboardInterrupt:
            print()
            return 130
        if text is None or text.strip() in ("/bye", "/exit", "/quit"):
            return 0
        if not text.strip():
            continue
        if text.strip() == "/clear":
            history = history[:1] if system else []
            continue
        history.append(ChatMessage(role="user", content=text))
        parts = []
        try:
            for piece in session.reply(history):
                parts.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except CliError as error:
            history.pop()
            print(f"error: {error}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        _print_stats(session)
        sys.stdout.write("\n")
        history.append(ChatMessage(role="assistant", content="".join(parts)))


def run(args: argparse.Namespace) -> int:
    model, prompt = model_and_prompt(args.words, args.model)
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise CliError("nothing to answer: stdin was empty; give a prompt, or run in a terminal to chat")
    try:
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        system = [ChatMessage(role="system", content=args.system)] if args.system else []
        messages = [*system, ChatMessage(role="user", content=prompt or "")]
    except ValueError as e:
        raise CliError(str(e)) from None
    session = _session(args, model, sampling)
    if prompt is None:
        return _converse(session, args.system)
    for piece in session.reply(messages):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _print_stats(session)
    return 0
