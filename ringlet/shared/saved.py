"""What a node keeps across its restarts, each a JSON list under `~/.ringlet`: the instances a user created through
it (`instances.json`: which model and which kind of instance, not where: placement is done again, on the nodes
there are then; a deleted instance leaves the file), and its downloads not yet finished (`downloads.json`, resumed
when the node starts again; `models/download.py`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from ringlet.shared.instances import InstanceType, IpexOptimizationLevel

log = logging.getLogger(__name__)
Item = TypeVar("Item", bound=BaseModel)


class SavedInstance(BaseModel):
    instance_id: str
    model: str
    instance_type: InstanceType
    min_nodes: int = 1
    intel_gpu_devices: tuple[int, ...] | None = None  # an IpexRing's options, as it was created with them
    ipex_optimization_level: IpexOptimizationLevel = "auto"
    max_context: int | None = None
    tensor_parallel: int = 1


class SavedList(Generic[Item]):
    """A JSON file holding a list of `Item`s, each known by `key(item)`."""

    def __init__(self, path: Path, item: type[Item], key: Callable[[Item], str]) -> None:
        self.path, self._key = path, key
        self._file = TypeAdapter(list[item])  # type: ignore[valid-type]

    def load(self) -> list[Item]:
        """What the file holds; a file that cannot be read is set aside (`.bad`) with a warning, never fatal."""
        try:
            return list(self._file.validate_json(self.path.read_bytes()))
        except FileNotFoundError:
            return []
        except (OSError, ValidationError) as error:
            aside = self.path.with_suffix(".json.bad")
            log.warning("%s cannot be read (%s); moved to %s, and nothing in it is taken up again", self.path,
                        str(error).splitlines()[0], aside)
            self.path.replace(aside)
            return []

    def add(self, saved: Item) -> None:
        self._write([*self.load(), saved])

    def remove(self, key: str) -> None:
        kept = self.load()
        if any(self._key(s) == key for s in kept):
            self._write([s for s in kept if self._key(s) != key])

    def _write(self, saved: list[Item]) -> None:
        """Replace the file whole (a crash mid-write leaves the old one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".json.partial")
        partial.write_bytes(self._file.dump_json(saved, indent=2))
        os.replace(partial, self.path)


class SavedInstances(SavedList[SavedInstance]):
    def __init__(self, path: Path) -> None:
        super().__init__(path, SavedInstance, lambda saved: saved.instance_id)

    def remove(self, key: str, replaced_by: str | None = None) -> None:
        """Forget an instance, or, `replaced_by` another placed in its stead, keep that one instead."""
        if replaced_by is None:
            super().remove(key)
            return
        kept = self.load()
        if any(s.instance_id == key for s in kept):
            self._write([s.model_copy(update={"instance_id": replaced_by}) if s.instance_id == key else s
                         for s in kept])
