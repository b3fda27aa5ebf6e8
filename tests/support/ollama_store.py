"""An Ollama store as `ollama pull` leaves it, built in a temp dir: manifests naming content-addressed blobs."""

from __future__ import annotations

import json
from pathlib import Path

WEIGHTS = "application/vnd.ollama.image.model"


def pull(root: Path, name: tuple[str, str, str, str], blob: Path, *, digest: str = "ab" * 32,
         extra: dict[str, str] | None = None, spelling: str = "sha256-") -> Path:
    """A manifest under manifests/HOST/NAMESPACE/MODEL/TAG and the weights (`blob`, linked) as its model layer, with a
    template layer beside it and `extra` layers (media type -> hex digest); returns the blob's path in the store."""
    layers = [{"mediaType": WEIGHTS, "digest": f"sha256:{digest}", "size": blob.stat().st_size},
              {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "cd" * 32, "size": 9}]
    layers += [{"mediaType": kind, "digest": f"sha256:{hex_digest}", "size": 1} for kind, hex_digest in
               (extra or {}).items()]
    manifest = root / "manifests" / Path(*name)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    (root / "blobs").mkdir(exist_ok=True)
    target = root / "blobs" / f"{spelling}{digest}"
    target.symlink_to(blob)
    return target
