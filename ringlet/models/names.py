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

from collections.abc import Sequence
from pathlib import Path

from ringlet.models.catalog import ModelCard, card_from_args, catalog, embedded_card, find_card
from ringlet.models.gguf_loader import gguf_size
from ringlet.models.loader import EMBEDDED_ALIASES, read_model_config
from ringlet.models.ollama import OllamaModel, find_ollama_model, ollama_models
from ringlet.models.store import ModelRef, extra_model_dirs, find_local, ringlet_home
from ringlet.shared.errors import InvalidModelError, ModelLoadError, ModelNotFoundError


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
        """The card a request's model name means; ModelNotFoundError lists the names that work."""
        wanted = _normalise(name)
        card = find_card(wanted)
        if card is not None:
            return card
        if wanted in EMBEDDED_ALIASES:
            return embedded_card()
        for card in self._local.values():
            if wanted in (card.id.lower(), Path(card.id).name.lower(), Path(card.id).stem.lower()):
                return card
        for card in self.ollama_cards():
            if _normalise(card.id) == wanted:
                return card
        stored = self._stored(name)
        if stored is not None:
            return stored
        raise ModelNotFoundError(name, [c.id for c in self.cards()])

    def _stored(self, name: str) -> ModelCard | None:
        """The card of a model pulled into the store (ORG/NAME, a GGUF repo's file as ORG/NAME:QUANT) that the
        curated catalog does not list; None when the store has no such model."""
        path = find_local(name.strip())
        if path is None:
            return None
        model_id = str(ModelRef.parse(name.strip()))
        if model_id not in self._store:
            try:
                _, args = read_model_config(path)
            except ModelLoadError as error:
                raise InvalidModelError(f"{model_id} is in the store but is not a model this node can load: "
                                        f"{error}") from None
            self._store[model_id] = card_from_args(model_id, args, format="gguf" if path.suffix == ".gguf" else
                                                   "safetensors", source="local", download_bytes=_size_on_disk(path))
        return self._store[model_id]

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
        try:
            _, args = read_model_config(pulled.path)
        except ModelLoadError as error:
            raise InvalidModelError(f"Ollama model {pulled.name} is not a model this node can load: {error}") from None
        return card_from_args(pulled.name, args, format="gguf", source="ollama", download_bytes=pulled.size_bytes)

    def add_local(self, ref: str) -> ModelCard:
        """A card for a model directory or .gguf file on this node, remembered under its absolute path."""
        try:
            return self.resolve(ref)
        except ModelNotFoundError:
            if not _is_existing_path(ref):
                try:
                    pulled = find_ollama_model(ref)
                except ModelLoadError as error:
                    raise InvalidModelError(str(error)) from None
                if pulled is None:
                    raise
                card = self._ollama_card(pulled)
                self._ollama[(pulled.name, pulled.path)] = card
                return card
            if not self._within_roots(ref):
                raise
        try:
            path, args = read_model_config(ref)
        except ModelLoadError as error:
            raise InvalidModelError(f"{ref!r} is not a model this node can load: {error}") from None
        model_id = str(path.resolve())
        card = card_from_args(model_id, args, format="safetensors" if path.is_dir() else "gguf", source="local",
                              download_bytes=_size_on_disk(path))
        self._local[model_id] = card
        return card


    def _within_roots(self, ref: str) -> bool:
        path = Path(ref).expanduser().resolve()
        return any(path == root or root in path.parents for root in self.local_roots)


def default_model_roots() -> list[Path]:
    return [ringlet_home() / "models", *extra_model_dirs()]


def _is_existing_path(ref: str) -> bool:
    try:
        return Path(ref).expanduser().exists()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, an unknown ~user, a name too long: not a path
        return False


def _size_on_disk(path: Path) -> int:
    if path.is_file():
        return gguf_size(path)
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
