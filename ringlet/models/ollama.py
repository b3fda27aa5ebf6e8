"""Models already pulled with Ollama, read in place from its store (never copied).

Ollama keeps a model as an OCI-style manifest naming content-addressed blobs; the weights are a plain GGUF file:

    $OLLAMA_MODELS (default ~/.ollama/models)
      manifests/registry.ollama.ai/library/llama3.2/1b     JSON: layers with a mediaType and a sha256 digest
      blobs/sha256-<hex>                                    the layer whose mediaType is ...image.model: GGUF

A name is Ollama's `[host/][namespace/]model[:tag]`: `llama3.2:1b`, `qwen3` (tag `latest`), `user/model:q4`,
`hf.co/org/repo:Q4_K_M`. The chat template comes from the GGUF file itself; Ollama's Go template is not read.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ringlet.shared.errors import ModelLoadError

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
# layers that change what the weights compute: serving the model without them would give other answers
_UNSUPPORTED_LAYERS = {"application/vnd.ollama.image.adapter": "a LoRA adapter",
                       "application/vnd.ollama.image.projector": "a vision projector"}
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")  # each part of a name, as Ollama allows them
_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")


def ollama_models_dir() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or "~/.ollama/models").expanduser()


@dataclass(frozen=True)
class OllamaName:
    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, text: str) -> OllamaName | None:
        """The name's parts, or None when `text` cannot be an Ollama name (a path, a URL, a bad character)."""
        base, _, tag = text.strip().partition(":")
        parts = base.split("/")
        if not 1 <= len(parts) <= 3 or not all(_PART.match(p) for p in [*parts, tag or DEFAULT_TAG]):
            return None
        host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
        if len(parts) == 3:
            host, namespace = parts[0], parts[1]
        elif len(parts) == 2:
            namespace = parts[0]
        return cls(host, namespace, parts[-1], tag or DEFAULT_TAG)

    def __str__(self) -> str:
        """The short form Ollama prints: defaults left out, the tag always there."""
        prefix = "" if self.host == DEFAULT_HOST else f"{self.host}/"
        if prefix or self.namespace != DEFAULT_NAMESPACE:
            prefix += f"{self.namespace}/"
        return f"{prefix}{self.model}:{self.tag}"

    def manifest(self, root: Path) -> Path:
        return root / "manifests" / self.host / self.namespace / self.model / self.tag


@dataclass(frozen=True)
class OllamaModel:
    name: str  # the short form, e.g. llama3.2:1b
    path: Path  # the GGUF blob
    size_bytes: int


def find_ollama_model(ref: str, root: Path | None = None) -> OllamaModel | None:
    """The GGUF blob an Ollama name stands for, when Ollama's store has it; None when it does not.

    Raises ModelLoadError when the manifest is there but cannot be served as it is (unreadable, its blob missing,
    or a layer such as a LoRA adapter that ringlet would silently leave out)."""
    name = OllamaName.parse(ref)
    if name is None:
        return None
    root = ollama_models_dir() if root is None else root
    lowered = OllamaName(name.host.lower(), name.namespace.lower(), name.model.lower(), name.tag.lower())
    for spelling in (name, lowered):  # Ollama matches names case-insensitively and stores them in lower case
        if spelling.manifest(root).is_file():
            return _read_manifest(str(spelling), spelling.manifest(root), root)
    return None


def ollama_models(root: Path | None = None) -> list[OllamaModel]:
    """Every model in Ollama's store that ringlet can serve, by name."""
    root = ollama_models_dir() if root is None else root
    found = []
    for manifest in sorted((root / "manifests").glob("*/*/*/*")):
        if not manifest.is_file():
            continue
        host, namespace, model, tag = manifest.relative_to(root / "manifests").parts
        try:
            found.append(_read_manifest(str(OllamaName(host, namespace, model, tag)), manifest, root))
        except ModelLoadError:
            continue  # listed by `ollama list`, not servable here; loading it by name says why
    return found


def _read_manifest(name: str, manifest: Path, root: Path) -> OllamaModel:
    try:
        layers = json.loads(manifest.read_text())["layers"]
        kinds = {layer["mediaType"]: layer["digest"] for layer in layers}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"Ollama model {name}: cannot read its manifest {manifest} ({e}); "
                             f"`ollama pull {name}` repairs it") from None
    for media_type, what in _UNSUPPORTED_LAYERS.items():
        if media_type in kinds:
            raise ModelLoadError(f"Ollama model {name} has {what}, which ringlet does not apply; serve its base "
                                 "model, or a GGUF file with the adapter merged")
    digest = kinds.get(MODEL_MEDIA_TYPE)
    match = _DIGEST.match(digest) if isinstance(digest, str) else None
    if match is None:
        raise ModelLoadError(f"Ollama model {name}: its manifest {manifest} names no model weights")
    for spelling in (f"sha256-{match.group(1)}", f"sha256:{match.group(1)}"):  # older Ollama versions used ':'
        blob = root / "blobs" / spelling
        if blob.is_file():
            return OllamaModel(name, blob, blob.stat().st_size)
    raise ModelLoadError(f"Ollama model {name}: its weights {root / 'blobs'}/sha256-{match.group(1)} are missing; "
                         f"`ollama pull {name}` fetches them again")
