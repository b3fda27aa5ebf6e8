"""`ringlet pull MODEL`, `ringlet models` and `ringlet rm MODEL`: the local model store from the shell."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ringlet.cli import CliError
from ringlet.models.embedded import EMBEDDED_MODEL_ID
from ringlet.shared.errors import ModelLoadError

if TYPE_CHECKING:
    from ringlet.models.download import DownloadProgress
    from ringlet.models.ollama import OllamaModel

# ringlet.models.{download,store,catalog} import torch (via the safetensors loader) and huggingface_hub:
# they are imported inside the commands so that every other `ringlet` command starts fast.

_EMBEDDED_NAMES = {EMBEDDED_MODEL_ID.lower(), "default", "smollm2-135m", "smollm2-135m-instruct"}


def register(subparsers: argparse._SubParsersAction) -> None:
    pull = subparsers.add_parser("pull", help="download a model from Hugging Face into the local store")
    pull.add_argument("model", help="ORG/NAME as on Hugging Face (e.g. Qwen/Qwen3-0.6B); ORG/NAME:QUANT picks one "
                                    "GGUF file of a GGUF repo; an Ollama library name (qwen3:8b, llama3.2:1b) "
                                    "pulls the GGUF repo and quantisation ringlet maps it to")
    pull.add_argument("--layers", metavar="START:END", type=_layers_arg,
                      help="fetch only the files that hold layers START..END-1 (one pipeline stage)")
    pull.add_argument("--offline", action="store_true",
                      help="use only what is on disk, no network (also HF_HUB_OFFLINE=1)")
    pull.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    pull.add_argument("--workers", type=int, default=4, help="files fetched in parallel (default: 4)")
    pull.set_defaults(func=_pull)

    models = subparsers.add_parser("models", help="list downloaded models (and those pulled with Ollama): size, "
                                                   "complete or not")
    models.add_argument("--catalog", action="store_true", help="list the curated models with their sizes instead")
    models.set_defaults(func=_list)

    rm = subparsers.add_parser("rm", help="delete a downloaded model from the local store")
    rm.add_argument("model", nargs="?", help="ORG/NAME as `ringlet models` lists it, an Ollama library name pulled "
                                             "with `ringlet pull`, or a name `ringlet cp` made (only the name goes)")
    rm.add_argument("--repacked", action="store_true",
                    help="without a model: delete the weights ringlet repacked from every GGUF file (a load makes a "
                         "model's again)")
    rm.set_defaults(func=_remove)

    cp = subparsers.add_parser("cp", help="give a model a second name (its files are shared, not copied)")
    cp.add_argument("source", help="a model on this machine, by any of its names")
    cp.add_argument("destination", help="the new name: model[:tag] or namespace/model[:tag]")
    cp.set_defaults(func=_copy)

    show = subparsers.add_parser("show", help="a model's architecture, size, context and quantisation")
    show.add_argument("model", help="a name, ORG/NAME, a path or an Ollama name")
    show.set_defaults(func=_show)

    stop = subparsers.add_parser("stop", help="unload a model from a running node")
    stop.add_argument("model", help="the model, as `ringlet ps` lists it")
    stop.add_argument("--url", default="http://localhost:52415", help="the node (default http://localhost:52415)")
    stop.set_defaults(func=_stop)


def _pull(args: argparse.Namespace) -> int:
    return pull(args.model, layers=args.layers, revision=args.revision, offline=args.offline, workers=args.workers)


def pull(model: str, layers: tuple[int, int] | None = None, revision: str = "main", offline: bool = False,
         workers: int = 4) -> int:
    """Download `model` into the store with progress bars on stderr; the exit code (errors as CliError)."""
    from ringlet.models.download import DownloadCancelled, HubSettings, download_model
    from ringlet.models.ollama import pull_ref
    from ringlet.models.store import ModelRef

    if model.strip().lower() in _EMBEDDED_NAMES:
        print(f"{EMBEDDED_MODEL_ID} is embedded in ringlet; nothing to download")
        return 0
    if Path(model).expanduser().exists():
        raise CliError(f"{model} is a local path; run it directly, there is nothing to pull")
    ref = pull_ref(model)
    try:
        ModelRef.parse(ref)
    except ModelLoadError as e:
        raise CliError(f"{e}; or an Ollama library name ringlet maps, such as qwen3:8b") from None
    if ref != model.strip():
        print(f"{model} is {ref}", file=sys.stderr)
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per HTTP request drowns the progress bars
    settings = HubSettings.from_env(offline=True if offline else None)
    cancel = threading.Event()
    outcome: dict[str, object] = {}
    console = Console(stderr=True)
    with _ProgressBars(console) as bars:
        def run() -> None:
            try:
                outcome["path"] = download_model(ref, layers=layers, revision=revision, settings=settings,
                                                 max_workers=workers, progress=bars.show, cancel=cancel)
            except ModelLoadError as e:  # DownloadError and friends: the message says what to do
                outcome["error"] = e

        worker = threading.Thread(target=run, name="pull", daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(0.2)
        except KeyboardInterrupt:
            cancel.set()
            worker.join()
            console.print(f"interrupted; `ringlet pull {model}` resumes where it stopped")
            return 130
    error = outcome.get("error")
    if isinstance(error, DownloadCancelled):
        return 130
    if isinstance(error, ModelLoadError):
        raise CliError(str(error))
    path = Path(str(outcome["path"]))
    size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.iterdir()) if f.is_file())
    print(f"{model}: ready at {path} ({_size(size)})")
    return 0


def _show(args: argparse.Namespace) -> int:
    from ringlet.models.names import Catalog, is_existing_path
    from ringlet.shared.errors import NodeError

    try:  # a path named here is read wherever it is: only a node keeps to its model folders
        card = Catalog(local_roots=[Path(args.model)] if is_existing_path(args.model) else None).add_local(args.model)
    except NodeError as error:
        raise CliError(str(error)) from None
    quantised = [d for d in card.bytes_per_dtype if d not in ("float32", "bfloat16", "float16")]
    rows = [("model", card.id), ("architecture", card.architecture), ("format", card.format),
            ("parameters", f"{card.num_parameters / 1e9:.2f}B"), ("layers", str(card.num_layers)),
            ("hidden size", str(card.hidden_size)),
            ("attention heads", f"{card.num_attention_heads} ({card.num_key_value_heads} for keys and values)"),
            ("context length", str(card.context_length)), ("vocabulary", str(card.vocab_size)),
            ("weights", card.quantization or ", ".join(quantised) or "bf16"),
            ("size", _size(card.download_bytes or card.weight_bytes("bfloat16"))),
            ("runs as", ", ".join(t.value for t in card.instance_types))]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    from ringlet.cli.client import NodeApiError, NodeClient

    try:
        answer = NodeClient(args.url).get_json("/api/generate", {"model": args.model, "prompt": "", "keep_alive": 0,
                                                                 "stream": False})
    except NodeApiError as error:
        raise CliError(str(error)) from None
    print(f"{args.model}: {'unloaded' if answer.get('done_reason') == 'unload' else answer.get('done_reason')}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from ringlet.models import repack_cache
    from ringlet.models.aliases import ModelAliases
    from ringlet.models.catalog import catalog
    from ringlet.models.embedded import embedded_model_path
    from ringlet.models.ollama import ollama_models
    from ringlet.models.store import ModelStore

    store = ModelStore()
    rows: list[tuple[str, ...]]
    if args.catalog:
        rows = [("MODEL", "PARAMS", "LAYERS", "CONTEXT", "BF16", "ON DISK")]
        stored = {m.repo_id.lower(): m for m in store.models()}
        for card in catalog(include_embedded=False):  # parsing the embedded GGUF takes seconds; it is listed below
            here = stored[card.id.lower()].status if card.id.lower() in stored else "-"
            rows.append((card.id, f"{card.num_parameters / 1e9:.2f}B", str(card.num_layers),
                         str(card.context_length), _size(card.weight_bytes("bfloat16")), here))
        _print_table(rows)
        print(f"\n{EMBEDDED_MODEL_ID} (Q4_1 GGUF) is embedded: it needs no download")
        return 0
    rows = [("MODEL", "STATUS", "SIZE", "DETAIL", "PATH")]
    try:
        embedded = embedded_model_path()
        rows.append((EMBEDDED_MODEL_ID, "embedded", _size(embedded.stat().st_size), "Q4_1 GGUF", str(embedded)))
    except ModelLoadError as e:
        rows.append((EMBEDDED_MODEL_ID, "missing", "-", str(e), "-"))
    for model in store.models():
        detail = model.detail
        if model.incomplete_bytes:
            detail += f"; {_size(model.incomplete_bytes)} of unfinished downloads (`ringlet pull` resumes)"
        if model.read_only:
            detail += "; read-only"
        rows.append((model.repo_id, model.status, _size(model.size_bytes), detail, str(model.path)))
    for pulled in ollama_models():  # served in place, by the name Ollama gave them
        rows.append((pulled.name, "ollama", _size(pulled.size_bytes), "GGUF pulled with Ollama", str(pulled.path)))
    for alias in ModelAliases().all():  # names `ringlet cp` made: their model's files, no more space
        rows.append((alias.name, "name", "-", f"another name of {alias.target}", "-"))
    _print_table(rows)
    if len(rows) == 2:
        print(f"\nno downloaded models in {store.root}; `ringlet pull Qwen/Qwen3-0.6B` fetches one")
    if repacked := repack_cache.size_of(repack_cache.cache_root()):
        print(f"\nweights repacked from GGUF files: {_size(repacked)} in {repack_cache.cache_root()} "
              "(`ringlet rm --repacked` deletes them)")
    return 0


def _remove(args: argparse.Namespace) -> int:
    from ringlet.models import repack_cache

    if args.model is None and args.repacked:
        print(f"removed the weights repacked from GGUF files ({_size(repack_cache.clear())} freed)")
        return 0
    if args.model is None or args.repacked:
        raise CliError("name a model to remove (`ringlet models` lists them), or give --repacked alone to delete the "
                       "weights repacked from GGUF files")
    if args.model.strip().lower() in _EMBEDDED_NAMES:
        raise CliError(f"{EMBEDDED_MODEL_ID} is embedded in the installed package and cannot be removed")
    from ringlet.models.aliases import ModelAliases
    from ringlet.models.ollama import pull_ref
    from ringlet.models.store import ModelStore

    aliases = ModelAliases()
    if (alias := aliases.remove(args.model)) is not None:
        print(f"removed the name {alias.name}; {alias.target} stays")
        return 0
    store = ModelStore()
    try:
        stored = store.get(pull_ref(args.model))
        files = [stored.path / name for name in stored.gguf_files] if stored is not None else []
        model = store.remove(pull_ref(args.model))
    except ModelLoadError as e:
        if (pulled := _pulled_with_ollama(args.model)) is None:
            raise CliError(str(e)) from None
        return _forget_ollama_model(pulled)
    cached = repack_cache.forget(files)  # its GGUF files' weights as the loader repacked them
    names = [alias.name for alias in aliases.remove_pointing_to(model.repo_id)]
    print(f"removed {model.repo_id} ({_size(model.size_bytes + model.incomplete_bytes + cached)} freed)"
          + (f" and its names {', '.join(names)}" if names else ""))
    return 0


def _pulled_with_ollama(name: str) -> OllamaModel | None:
    from ringlet.models.ollama import find_ollama_model

    try:
        return find_ollama_model(name)
    except ModelLoadError:  # in Ollama's store, but not servable: still Ollama's to remove
        return None


def _forget_ollama_model(model: OllamaModel) -> int:
    """A model Ollama pulled is Ollama's: ringlet reads its blob in place, so all `rm` removes is the weights
    ringlet repacked from it."""
    from ringlet.models import repack_cache
    from ringlet.models.ollama import ollama_models_dir

    freed = repack_cache.forget([model.path])
    whose = (f"{model.name} is a model Ollama pulled into {ollama_models_dir()}, which ringlet serves in place "
             f"without a copy: `ollama rm {model.name}` deletes it")
    if not freed:
        raise CliError(whose)
    print(f"removed ringlet's repacked weights of {model.name} ({_size(freed)} freed); {whose}")
    return 0


def _copy(args: argparse.Namespace) -> int:
    from ringlet.models.names import Catalog
    from ringlet.shared.errors import NodeError

    try:
        alias = Catalog().copy(args.source, args.destination)
    except NodeError as error:
        raise CliError(str(error)) from None
    print(f"{alias.name} is now a name of {alias.target}")
    return 0


class _ProgressBars:
    """A rich progress display fed by download callbacks (which arrive from worker threads)."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=False)
        self.tasks: dict[str, TaskID] = {}
        self.lock = threading.Lock()

    def __enter__(self) -> Self:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def show(self, update: DownloadProgress) -> None:
        with self.lock:
            for name, done, total in [("total", update.done, update.total)] + [
                    (f.name, f.done, f.total) for f in update.files]:
                if name not in self.tasks:
                    self.tasks[name] = self.progress.add_task(name, total=total)
                self.progress.update(self.tasks[name], completed=done, total=total)


def _layers_arg(text: str) -> tuple[int, int]:
    """'START:END' -> (start, end), END exclusive."""
    start, sep, end = text.partition(":")
    if sep and start.isdigit() and end.isdigit() and int(start) < int(end):
        return int(start), int(end)
    raise argparse.ArgumentTypeError(f"{text!r}: expected START:END with 0 <= START < END, e.g. 0:14")


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    sys.stdout.flush()


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
