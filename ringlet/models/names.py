"""The models a node knows by name: the curated catalog, the embedded model, local paths it was given, models pulled
into the store (`ORG/NAME`), and the models pulled with Ollama on this machine (by their Ollama names,
`llama3.2:1b`).

A local path is loaded only from the node's model directories (the store, `RINGLET_MODEL_DIRS`, `--models-dir`,
and the `--model` it started with): any other path reads as a missing model, the same 404, so the API neither
loads nor reveals what else is on the node's disk.

Requests name models loosely ("default", "smollm2-135m", "SmolLM2-135M-Instruct:latest" from Ollama tools,
the directory name of a local model); `resolve` turns any of them into the one card whose `id` instances use.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ringlet.models.aliases import ModelAlias, ModelAliases
from ringlet.models.catalog import (
    ModelCard,
    card_from_path,
    catalog,
    embedded_card,
    find_card,
    resolve_card,
)
from ringlet.models.gguf_loader import gguf_size
from ringlet.models.loader import EMBEDDED_ALIASES, names_a_path, resolve_model_path
from ringlet.models.ollama import OllamaModel, find_ollama_model, library_model, ollama_models
from ringlet.models.store import (
    MANIFEST_FILE,
    ModelRef,
    ModelStore,
    extra_model_dirs,
    find_local,
    gguf_models,
    ringlet_home,
)
from ringlet.shared.errors import InvalidModelError, ModelLoadError, ModelNotFoundError, NodeError


@dataclass(frozen=True)
class DiskModel:
    """A model whose files are on this node: its card, their size, when they last changed, and a digest of them."""

    card: ModelCard
    size_bytes: int
    modified: float  # seconds since the epoch
    digest: str  # sha256, hex


def _normalise(name: str) -> str:
    return name.strip().removesuffix(":latest").lower()


class Catalog:
    """The cards a node can place: the curated catalog, the embedded model, and local paths it was given."""

    def __init__(self, local_roots: Sequence[Path] | None = None) -> None:
        """`local_roots`: the directories (or files) whose models `add_local` loads (default: the store and
        RINGLET_MODEL_DIRS)."""
        self._local: dict[str, ModelCard] = {}  # cards of local paths, by their id (the absolute path)
        self._ollama: dict[tuple[str, Path], ModelCard | None] = {}  # by Ollama name and blob; None: cannot run
        self._store: dict[str, ModelCard] = {}  # cards of pulled models the curated catalog lacks, by ORG/NAME
        roots = default_model_roots() if local_roots is None else local_roots
        self.local_roots = [Path(r).expanduser().resolve() for r in roots]

    def cards(self) -> list[ModelCard]:
        return [*catalog(), *self._local.values(), *self._store.values(), *self.ollama_cards()]

    def resolve(self, name: str) -> ModelCard:
        """The card a request's model name means; ModelNotFoundError lists the names that work. A second name made
        by a copy (`ModelAliases`) and an Ollama library name pulled into the store (`qwen3:8b`) mean the card of
        the model they stand for."""
        try:
            return self._resolve(name)
        except ModelNotFoundError:
            alias = ModelAliases().get(name)
            if alias is not None:
                try:
                    return self._resolve(alias.target)
                except ModelNotFoundError:
                    raise ModelNotFoundError(name, [c.id for c in self.cards()],
                                             f"it names {alias.target}, which this node no longer has") from None
            library = library_model(name)
            if library is None:
                raise
            stored = self._stored(library.ref)
            if stored is None:
                raise ModelNotFoundError(name, [c.id for c in self.cards()],
                                         f"it is {library.ref}, not pulled yet: `ringlet pull {name}` (or POST "
                                         "/api/pull) fetches it") from None
            return stored

    def _resolve(self, name: str) -> ModelCard:
        wanted = _normalise(name)
        card = find_card(wanted)
        # the embedded model's names, its Hugging Face repo's too unless that repo was pulled (as the loader reads
        # them: `resolve_model_path`)
        if wanted in EMBEDDED_ALIASES and (card is None or find_local(name.strip()) is None):
            return embedded_card()
        if card is not None:
            return card
        for card in self._local.values():
            if wanted in (card.id.lower(), Path(card.id).name.lower(), Path(card.id).stem.lower()):
                return card
        for card in self.ollama_cards():
            if _normalise(card.id) == wanted:
                return card
        stored = self._stored(name)
        if stored is not None:
            return stored
        for card in self._store.values():  # a repo placed before its files are here
            if card.id.lower() == wanted:
                return card
        missing = names_a_path(name.strip()) and not is_existing_path(name.strip())
        raise ModelNotFoundError(name, [c.id for c in self.cards()], "no such file or folder" if missing else "")

    def _stored(self, name: str) -> ModelCard | None:
        """The card of a model pulled into the store (ORG/NAME, a GGUF repo's file as ORG/NAME:QUANT) that the
        curated catalog does not list; None when the store has no such model."""
        path = find_local(name.strip())
        if path is None:
            return None
        ref = ModelRef.parse(name.strip())
        model_id = str(ref)
        # a repo of one GGUF model is known by the repo's name alone, however it was asked for (`qwen3:0.6b` and
        # the ORG/NAME the dashboard lists are one model, with one instance)
        if ref.variant is not None and path.suffix == ".gguf":
            stored = ModelStore().get(ref.repo_id)
            if stored is not None and len(gguf_models(stored.gguf_files)) == 1:
                model_id = ref.repo_id
        if model_id not in self._store:
            try:
                self._store[model_id] = _disk_card(model_id, path)
            except ModelLoadError as error:
                raise InvalidModelError(f"{model_id} is in the store but is not a model this node can load: "
                                        f"{error}") from None
        return self._store[model_id]

    def on_disk(self) -> list[DiskModel]:
        """The models whose files are on this node: the embedded one, those in the store (complete), local paths the
        node was given, and those pulled with Ollama."""
        from ringlet.models.embedded import embedded_model_path

        embedded = embedded_model_path()
        found = [DiskModel(embedded_card(), embedded.stat().st_size, embedded.stat().st_mtime,
                           _file_digest(embedded, embedded.stat().st_size, embedded.stat().st_mtime_ns))]
        for stored in ModelStore().models():
            if stored.status != "complete":
                continue
            try:
                card = self._stored(stored.repo_id)
            except NodeError:
                continue  # not a model this node runs
            if card is not None:
                found.append(DiskModel(card, stored.size_bytes, _newest(stored.path), _manifest_digest(stored.path)))
        for card in self._local.values():
            path = Path(card.id)
            found.append(DiskModel(card, _size_on_disk(path), _newest(path), _listing_digest(path)))
        self.ollama_cards()  # each new blob's metadata read once
        for pulled in ollama_models():
            card = self._ollama.get((pulled.name, pulled.path))
            if card is not None:  # the blob is named by its own sha256, as Ollama stores it
                found.append(DiskModel(card, pulled.size_bytes, pulled.path.stat().st_mtime,
                                       pulled.path.name.removeprefix("sha256-")))
        return found

    def ollama_cards(self) -> list[ModelCard]:
        """Cards of the models pulled with Ollama that this node can run (each blob's metadata read once)."""
        cards = []
        for pulled in ollama_models():
            key = (pulled.name, pulled.path)
            if key not in self._ollama:
                try:
                    self._ollama[key] = self._ollama_card(pulled)
                except InvalidModelError:
                    self._ollama[key] = None  # an architecture ringlet does not run: asking for it by name says so
            if (card := self._ollama[key]) is not None:
                cards.append(card)
        return cards

    @staticmethod
    def _ollama_card(pulled: OllamaModel) -> ModelCard:
        try:  # the card of the file as it is (its type, its 4/5-bit share), under the name Ollama gives it
            card = card_from_path(pulled.name, pulled.path)
        except ModelLoadError as error:
            raise InvalidModelError(f"Ollama model {pulled.name} is not a model this node can load: {error}") from None
        return card.model_copy(update={"source": "ollama", "download_bytes": pulled.size_bytes})

    def add_local(self, ref: str) -> ModelCard:
        """A card for a model to place: one the node knows by name, a model directory or .gguf file on this node
        (remembered under its absolute path), a model pulled with Ollama, or a Hugging Face repo not downloaded yet
        (its card read from the hub: the runners fetch their stages' files)."""
        try:
            return self.resolve(ref)
        except ModelNotFoundError:
            if not is_existing_path(ref):
                if names_a_path(ref):
                    raise  # no such file or folder, as the error says
                try:
                    pulled = find_ollama_model(ref)
                except ModelLoadError as error:
                    raise InvalidModelError(str(error)) from None
                if pulled is None:
                    if library_model(ref) is not None:
                        raise  # not pulled yet; the error says how to pull it
                    return self._from_hub(ref)
                card = self._ollama_card(pulled)
                self._ollama[(pulled.name, pulled.path)] = card
                return card
            if not self._within_roots(ref):
                roots = ", ".join(str(r) for r in self.local_roots) or "none"
                raise ModelNotFoundError(ref, [c.id for c in self.cards()],
                                         f"it is a path outside this node's model folders ({roots}), from which alone "
                                         "it serves files (`ringlet node --models-dir`)") from None
        try:
            path = resolve_model_path(ref)
            model_id = str(path.resolve())
            card = _disk_card(model_id, path)
        except ModelLoadError as error:
            raise InvalidModelError(f"{ref!r} is not a model this node can load: {error}") from None
        self._local[model_id] = card
        return card

    def copy(self, source: str, destination: str) -> ModelAlias:
        """Ollama's `cp`: `destination` becomes a second name of the model `source` names, sharing its files (nothing
        is duplicated). ModelNotFoundError when this node has no files of `source`; InvalidModelError when
        `destination` cannot be a name or names another model already."""
        card = self.resolve(source)
        if card.source == "local" and Path(card.id).is_absolute():
            raise InvalidModelError(f"{source} is a local path, known by its path; copy its directory or file "
                                    "instead")
        if not (card.source in ("embedded", "ollama") or find_local(card.id) is not None):
            raise ModelNotFoundError(source, [c.id for c in self.cards()], f"its files are not on this node: "
                                     f"`ringlet pull {source}` fetches them")
        try:
            taken = self._resolve(destination)
        except (ModelNotFoundError, InvalidModelError):
            taken = None
        if taken is not None and taken.id != card.id:
            raise InvalidModelError(f"{destination} names the model {taken.id} already; pick another name")
        try:
            return ModelAliases().add(destination, card.id)
        except ModelLoadError as error:
            raise InvalidModelError(str(error)) from None


    def _from_hub(self, ref: str) -> ModelCard:
        """The card of a Hugging Face repo that is not on disk, from its config on the hub (HF_ENDPOINT)."""
        try:
            model_id = str(ModelRef.parse(ref.strip()))
        except ModelLoadError:
            raise ModelNotFoundError(ref, [c.id for c in self.cards()]) from None
        if model_id not in self._store:
            try:
                card = resolve_card(model_id)
            except ModelLoadError as error:  # the hub's word: no such repo, gated, unreachable
                raise InvalidModelError(f"{model_id} is not on this node and its card could not be read from the "
                                        f"hub: {error}") from None
            self._store[model_id] = card.model_copy(update={"id": model_id})
        return self._store[model_id]

    def _within_roots(self, ref: str) -> bool:
        path = Path(ref).expanduser().resolve()
        return any(path == root or root in path.parents for root in self.local_roots)


def default_model_roots() -> list[Path]:
    return [ringlet_home() / "models", *extra_model_dirs()]


def is_existing_path(ref: str) -> bool:
    try:
        return Path(ref).expanduser().exists()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, an unknown ~user, a name too long: not a path
        return False


def _disk_card(model_id: str, path: Path) -> ModelCard:
    """The card of a model directory or GGUF file on this node; ModelLoadError when no engine can run it (a directory
    of an architecture only mlx-lm has gets an MLX-only card): the card of the files as they are, a GGUF's types and
    4/5-bit share, a checkpoint's quantisation config."""
    return card_from_path(model_id, path).model_copy(update={"download_bytes": _size_on_disk(path)})


def _size_on_disk(path: Path) -> int:
    if path.is_file():
        return gguf_size(path)
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _newest(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return max((f.stat().st_mtime for f in files), default=path.stat().st_mtime)


@functools.lru_cache(maxsize=16)
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes (computed once for each size and modification time)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _manifest_digest(directory: Path) -> str:
    """sha256 of the store's manifest, which holds every file's own hash (Ollama's digest is its manifest's too)."""
    manifest = directory / MANIFEST_FILE
    return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else _listing_digest(directory)


def _listing_digest(path: Path) -> str:
    """sha256 of a model's file names, sizes and modification times: changes whenever a file does."""
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    listing = "\n".join(f"{f.name} {f.stat().st_size} {f.stat().st_mtime_ns}" for f in files)
    return hashlib.sha256(listing.encode()).hexdigest()

