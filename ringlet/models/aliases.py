"""Second names for models on this node, as Ollama's `cp` makes them: `aliases.json` in the store maps each name to the
id of the model it stands for, so a copy shares its source's files and takes no disk space.

    ModelAliases().add("my-qwen", "Qwen/Qwen3-8B-GGUF:Q4_K_M")   # `ollama cp qwen3:8b my-qwen`, POST /api/copy
    ModelAliases().get("my-qwen:latest").target                  # the source's id, which the loader resolves

Removing the source model from the store removes its aliases too (`ModelStore.remove` callers do it), so an alias
never names files that are gone; removing an alias leaves the files be.
"""

from __future__ import annotations

from pathlib import Path

import filelock
from pydantic import BaseModel, Field

from ringlet.models.ollama import OllamaName
from ringlet.models.store import ringlet_home
from ringlet.shared.errors import ModelLoadError
from ringlet.shared.saved import SavedList

ALIASES_FILE = "aliases.json"
MAX_ALIASES = 1000  # every name resolution reads the file: it stays small


class ModelAlias(BaseModel):
    name: str = Field(description="the second name, as given (an Ollama-style name: model[:tag], ns/model[:tag])")
    target: str = Field(description="the id of the model it stands for (ORG/NAME[:QUANT], an Ollama name, ...)")


def alias_key(name: str) -> str:
    """Names compare as Ollama compares them: case-insensitive, `:latest` the same as no tag, the default host and
    namespace the same as none."""
    parsed = OllamaName.parse(name)
    return (name.strip() if parsed is None else str(parsed)).lower().removesuffix(":latest")


class ModelAliases:
    def __init__(self, path: Path | None = None, most: int = MAX_ALIASES) -> None:
        self.path, self.most = path or ringlet_home() / "models" / ALIASES_FILE, most
        self._saved = SavedList(self.path, ModelAlias, lambda alias: alias_key(alias.name))
        # one writer at a time, across the API's threads and the CLI's processes
        self._lock = filelock.FileLock(str(self.path.with_suffix(".lock")), timeout=10)

    def all(self) -> list[ModelAlias]:
        return self._saved.load()

    def get(self, name: str) -> ModelAlias | None:
        if not self.path.is_file():
            return None
        key = alias_key(name)
        return next((alias for alias in self.all() if alias_key(alias.name) == key), None)

    def add(self, name: str, target: str) -> ModelAlias:
        """Name `target` also `name` (an alias of that name is replaced); ModelLoadError for a name that cannot be
        one."""
        parsed = OllamaName.parse(name)
        if parsed is None:
            raise ModelLoadError(f"{name!r} cannot be a model name: use model[:tag] or namespace/model[:tag], "
                                 "letters, digits, '_', '.' and '-'")
        if alias_key(name) == alias_key(target):
            raise ModelLoadError(f"{name!r} is the model's own name already")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            existing = [a for a in self.all() if alias_key(a.name) != alias_key(name)]
            if len(existing) >= self.most:
                raise ModelLoadError(f"{len(existing)} model names are kept already, the most this node keeps; "
                                     "delete some first")
            alias = ModelAlias(name=str(parsed), target=target)
            self._saved.remove(alias_key(name))
            self._saved.add(alias)
        return alias

    def remove(self, name: str) -> ModelAlias | None:
        """Forget one name; the alias it was, or None when it was none."""
        alias = self.get(name)
        if alias is not None:
            with self._lock:
                self._saved.remove(alias_key(name))
        return alias

    def remove_pointing_to(self, model: str) -> list[ModelAlias]:
        """Forget every name of `model` (its files are going; a repo id covers each GGUF file of it); those that
        were."""
        wanted = model.lower()
        gone = [alias for alias in self.all() if alias.target.lower() == wanted
                or alias.target.lower().startswith(f"{wanted}:")]
        if gone:
            with self._lock:
                for alias in gone:
                    self._saved.remove(alias_key(alias.name))
        return gone
