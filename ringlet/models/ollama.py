"""Models already pulled with Ollama, read in place from its store (never copied).

Ollama keeps a model as an OCI-style manifest naming content-addressed blobs; the weights are a plain GGUF file:

    $OLLAMA_MODELS (default ~/.ollama/models)
      manifests/registry.ollama.ai/library/llama3.2/1b     JSON: layers with a mediaType and a sha256 digest
      blobs/sha256-<hex>                                    the layer whose mediaType is ...image.model: GGUF

A name is Ollama's `[host/][namespace/]model[:tag]`: `llama3.2:1b`, `qwen3` (tag `latest`), `user/model:q4`,
`hf.co/org/repo:Q4_K_M`. The chat template comes from the GGUF file itself; Ollama's Go template is not read.

A library name that Ollama's store lacks (`qwen3:8b`) stands for a Hugging Face GGUF repo and quantisation of
`OLLAMA_LIBRARY` (`Qwen/Qwen3-8B-GGUF:Q4_K_M`), which `ringlet pull` fetches into ringlet's own store.
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


@dataclass(frozen=True)
class LibraryModel:
    """A name of Ollama's library (`qwen3:8b`) as a Hugging Face GGUF repo and the quantisation picked from it."""

    name: str  # the short form, e.g. qwen3:8b
    repo_id: str
    quant: str

    @property
    def ref(self) -> str:
        """What `ringlet pull` and the store know it by: ORG/NAME:QUANT."""
        return f"{self.repo_id}:{self.quant}"


# Ollama library models whose architecture ringlet runs, by size tag: the GGUF repo of the model's own publisher where
# it has one (else bartowski's llama.cpp conversions), and the quantisation Ollama ships (Q4_K_M; Q8_0 where the repo
# has no 4-bit file)
OLLAMA_LIBRARY: dict[str, dict[str, tuple[str, str]]] = {
    "qwen3": {"0.6b": ("Qwen/Qwen3-0.6B-GGUF", "Q8_0"), "1.7b": ("Qwen/Qwen3-1.7B-GGUF", "Q8_0"),
              "4b": ("Qwen/Qwen3-4B-GGUF", "Q4_K_M"), "8b": ("Qwen/Qwen3-8B-GGUF", "Q4_K_M"),
              "14b": ("Qwen/Qwen3-14B-GGUF", "Q4_K_M"), "32b": ("Qwen/Qwen3-32B-GGUF", "Q4_K_M")},
    "qwen2.5": {"0.5b": ("Qwen/Qwen2.5-0.5B-Instruct-GGUF", "Q4_K_M"),
                "1.5b": ("Qwen/Qwen2.5-1.5B-Instruct-GGUF", "Q4_K_M"),
                "3b": ("Qwen/Qwen2.5-3B-Instruct-GGUF", "Q4_K_M"), "7b": ("Qwen/Qwen2.5-7B-Instruct-GGUF", "Q4_K_M")},
    "llama3.2": {"1b": ("bartowski/Llama-3.2-1B-Instruct-GGUF", "Q4_K_M"),
                 "3b": ("bartowski/Llama-3.2-3B-Instruct-GGUF", "Q4_K_M")},
    "llama3.1": {"8b": ("bartowski/Meta-Llama-3.1-8B-Instruct-GGUF", "Q4_K_M")},
    "mistral": {"7b": ("bartowski/Mistral-7B-Instruct-v0.3-GGUF", "Q4_K_M")},
}
# the size Ollama's `latest` tag of each stands for
LIBRARY_LATEST = {"qwen3": "8b", "qwen2.5": "7b", "llama3.2": "3b", "llama3.1": "8b", "mistral": "7b"}
# a library tag: a size, optionally `-instruct`, optionally a quantisation (`8b`, `3b-instruct-q8_0`, `8b-q4_K_M`)
_LIBRARY_TAG = re.compile(r"^(?P<size>\d+(?:\.\d+)?[mb])(?:-instruct)?(?:-(?P<quant>q\d(?:_[a-z0-9]+)*|f16|bf16))?$")


def library_model(text: str) -> LibraryModel | None:
    """The GGUF repo and quantisation of an Ollama library name (`qwen3:8b`, `llama3.2`, `qwen3:4b-q8_0`); None for
    any other name (another namespace or host, a model or size not in `OLLAMA_LIBRARY`)."""
    name = OllamaName.parse(text)
    if name is None or name.host != DEFAULT_HOST or name.namespace != DEFAULT_NAMESPACE:
        return None
    model, tag = name.model.lower(), name.tag.lower()
    sizes = OLLAMA_LIBRARY.get(model)
    if sizes is None:
        return None
    if tag == DEFAULT_TAG:
        tag = LIBRARY_LATEST[model]
    match = _LIBRARY_TAG.match(tag)
    if match is None or match["size"] not in sizes:
        return None
    repo_id, quant = sizes[match["size"]]
    return LibraryModel(f"{model}:{name.tag.lower()}", repo_id, (match["quant"] or quant).upper())


def library_names() -> list[str]:
    """Every library name `library_model` maps, the way Ollama writes them."""
    return [f"{model}:{size}" for model, sizes in OLLAMA_LIBRARY.items() for size in sizes]


def pull_ref(name: str) -> str:
    """What pulling `name` downloads: an Ollama library name's GGUF repo and quantisation (`qwen3:8b` ->
    `Qwen/Qwen3-8B-GGUF:Q4_K_M`), else the name itself (a Hugging Face ORG/NAME[:QUANT])."""
    library = library_model(name)
    return library.ref if library is not None else name.strip()
