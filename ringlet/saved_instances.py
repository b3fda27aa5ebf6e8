"""The instances a user created through this node (`POST /instance`, the dashboard, `ringlet` commands), kept in
`~/.ringlet/instances.json` so that the node creates them again when it restarts: which model and which kind of
instance, not where (placement is done again, on the nodes there are then). A deleted instance leaves the file."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pydantic import BaseModel, TypeAdapter, ValidationError

from ringlet.shared.instances import InstanceType

log = logging.getLogger(__name__)


class SavedInstance(BaseModel):
    instance_id: str
    model: str
    instance_type: InstanceType
    min_nodes: int = 1


_FILE = TypeAdapter(list[SavedInstance])


class SavedInstances:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[SavedInstance]:
        """What the file holds; a file that cannot be read is set aside (`.bad`) with a warning, never fatal."""
        try:
            return _FILE.validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, ValidationError) as error:
            aside = self.path.with_suffix(".json.bad")
            log.warning("the saved instances in %s cannot be read (%s); moved to %s, none created again", self.path,
                        str(error).splitlines()[0], aside)
            self.path.replace(aside)
            return []

    def add(self, saved: SavedInstance) -> None:
        self._write([*self.load(), saved])

    def remove(self, instance_id: str) -> None:
        kept = self.load()
        if any(s.instance_id == instance_id for s in kept):
            self._write([s for s in kept if s.instance_id != instance_id])

    def _write(self, saved: list[SavedInstance]) -> None:
        """Replace the file whole (a crash mid-write leaves the old one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".json.partial")
        partial.write_bytes(_FILE.dump_json(saved, indent=2))
        os.replace(partial, self.path)
