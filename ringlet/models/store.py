"""The local model store: `$RINGLET_HOME/models/<org>/<name>/`, plus read-only extra directories.

A stored model is a plain Hugging Face directory (config.json, *.safetensors, tokenizer.json, ...) or
a directory holding GGUF files, so the loader reads it like any local path. Our own bookkeeping sits
in a hidden `.ringlet/` folder inside it:

    .ringlet/manifest.json     repo, commit and the hub's size/sha256 of every file we fetched
    .ringlet/incomplete/FILE   bytes of a download in progress (resumed next time, never loadable)
    .ringlet/lock              held while a download writes into the directory

A file only ever gets its final name once its sha256 matched, so whatever the loader can see is whole.
Extra directories (`RINGLET_MODEL_DIRS`, colon-separated, same `<org>/<name>` layout) are never written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import filelock
from pydantic import BaseModel, ConfigDict

from ringlet.shared.errors import ModelLoadError

META_DIR = ".ringlet"
MANIFEST_FILE = f"{META_DIR}/manifest.json"
INCOMPLETE_DIR = f"{META_DIR}/incomplete"
LOCK_FILE = f"{META_DIR}/lock"

StoreStatus = Literal["complete", "partial", "incomplete"]
# huggingface_hub's rule for repo ids: letters, digits, '-', '_', '.'; no '--' or '..'
_REPO_PART = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}$")


def ringlet_home() -> Path:
    return Path(os.environ.get("RINGLET_HOME") or "~/.ringlet").expanduser()


def extra_model_dirs() -> list[Path]:
    raw = os.environ.get("RINGLET_MODEL_DIRS", "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


@dataclass(frozen=True)
class ModelRef:
    """`org/name`, optionally `org/name:VARIANT` to pick one GGUF file of a repo (e.g. `:Q4_K_M`)."""

    repo_id: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        repo_id, _, variant = text.strip().partition(":")
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(_REPO_PART.match(p) for p in parts):
            raise ModelLoadError(
                f"{text!r} is not a Hugging Face model name; expected ORG/NAME (for example Qwen/Qwen3-0.6B), "
                "optionally ORG/NAME:QUANT to pick a GGUF file"
            )
        return cls(repo_id, variant or None)

    def __str__(self) -> str:
        return f"{self.repo_id}:{self.variant}" if self.variant else self.repo_id


class ManifestFile(BaseModel):
    size: int
    sha256: str | None = None  # LFS files
    blob_id: str | None = None  # git blob sha1, for small files kept in git
    verified_mtime_ns: int | None = None  # mtime at the last hash check: an unchanged file is not re-hashed


class Manifest(BaseModel):
    """What the hub said about the files we fetched; sizes and hashes are checked against it."""

    repo_id: str
    commit: str
    endpoint: str
    files: dict[str, ManifestFile] = {}


class StoredModel(BaseModel):
    model_config = ConfigDict(frozen=True)

    repo_id: str
    path: Path
    status: StoreStatus
    detail: str  # "16/16 layers", "layers 0-7 of 16", "no weights yet"
    format: Literal["safetensors", "gguf", "unknown"]
    size_bytes: int  # whole files only
    incomplete_bytes: int  # bytes of interrupted or running downloads
    read_only: bool
    gguf_files: list[str] = []


class ModelStore:
    def __init__(self, root: Path | None = None, extra_dirs: list[Path] | None = None) -> None:
        self.root = root if root is not None else ringlet_home() / "models"
        self.extra_dirs = extra_dirs if extra_dirs is not None else extra_model_dirs()

    def model_dir(self, repo_id: str) -> Path:
        """Where a download of this repo goes (the writable store)."""
        return self.root / ModelRef.parse(repo_id).repo_id

    def models(self) -> list[StoredModel]:
        found: list[StoredModel] = []
        seen: set[str] = set()
        for base, read_only in self._bases():
            for org in _subdirs(base):
                for model in _subdirs(org):
                    repo_id = f"{org.name}/{model.name}"
                    if repo_id.lower() in seen:
                        continue  # the writable store shadows extra directories
                    seen.add(repo_id.lower())
                    found.append(describe(model, repo_id, read_only))
        return sorted(found, key=lambda m: m.repo_id.lower())

    def get(self, ref: str) -> StoredModel | None:
        repo_id = ModelRef.parse(ref).repo_id
        for base, read_only in self._bases():
            directory = _find_case_insensitive(base, repo_id)
            if directory is not None:
                return describe(directory, f"{directory.parent.name}/{directory.name}", read_only)
        return None

    def remove(self, ref: str) -> StoredModel:
        model = self.get(ref)
        if model is None:
            raise ModelLoadError(f"model {ref!r} is not in the store ({self.root}); `ringlet models` lists it")
        if model.read_only:
            raise ModelLoadError(
                f"{model.repo_id} is in the read-only directory {model.path.parent.parent} (RINGLET_MODEL_DIRS); "
                "remove it by hand if you mean to"
            )
        with model_lock(model.path, what="remove it"):
            shutil.rmtree(model.path)
        org = model.path.parent
        if org.is_dir() and not any(org.iterdir()):
            org.rmdir()
        return model

    def _bases(self) -> list[tuple[Path, bool]]:
        return [(self.root, False)] + [(d, True) for d in self.extra_dirs if d != self.root]


def find_local(ref: str) -> Path | None:
    """The path the loader should open for "org/name[:variant]": the model directory, or its GGUF file.

    None when the store has no usable weights for it (not downloaded, or nothing finished yet).
    A partial download (some layers only) is returned too: the loader then loads the stages it has.
    """
    try:
        parsed = ModelRef.parse(ref)
    except ModelLoadError:
        return None  # not an org/name reference: let the caller report it as a missing path
    model = ModelStore().get(parsed.repo_id)
    if model is None or model.status == "incomplete":
        return None
    if model.format == "gguf":
        return model.path / pick_gguf(model.gguf_files, parsed)
    return model.path


# one part of a GGUF model split in several files, as llama.cpp's gguf-split names them
_SPLIT_GGUF = re.compile(r"^(?P<stem>.+)-(?P<number>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_gguf_parts(path: Path) -> list[Path]:
    """Every file of a split GGUF model (`NAME-00001-of-00003.gguf`, ...) in order, from any one of them; a file
    whose name is not a part's is a model by itself."""
    match = _SPLIT_GGUF.match(path.name)
    if match is None:
        return [path]
    count = int(match["count"])
    return [path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def gguf_models(files: list[str]) -> list[str]:
    """The GGUF models among a repo's files, each named by its first file (a split model's other parts left out)."""
    return [f for f in files if (m := _SPLIT_GGUF.match(Path(f).name)) is None or int(m["number"]) == 1]


def pick_gguf(files: list[str], ref: ModelRef) -> str:
    """The one GGUF model a reference means: the only one, or the one whose path contains the variant (a folder
    `Q4_K_M/` counts). A split model is named by its first file; `split_gguf_parts` gives the others."""
    models = gguf_models(files)
    if ref.variant:
        matches = [f for f in models if ref.variant.lower() in f.lower()]
    else:
        matches = models
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ModelLoadError(f"{ref}: no GGUF file matches; available: {', '.join(models) or 'none'}")
    raise ModelLoadError(
        f"{ref}: several GGUF files match ({', '.join(matches)}); "
        f"name one, for example {ref.repo_id}:{_quant_hint(matches[0])}"
    )


def describe(directory: Path, repo_id: str, read_only: bool) -> StoredModel:
    """Status of a model directory, worked out from the files on disk (the manifest is optional)."""
    manifest = read_manifest(directory)
    whole = [f for f in directory.rglob("*") if f.is_file() and META_DIR not in f.relative_to(directory).parts]
    incomplete = directory / INCOMPLETE_DIR
    incomplete_bytes = sum(f.stat().st_size for f in incomplete.rglob("*") if f.is_file()) if incomplete.is_dir() else 0
    gguf = sorted(str(f.relative_to(directory)) for f in whole if f.suffix == ".gguf")
    fmt: Literal["safetensors", "gguf", "unknown"]
    status: StoreStatus
    if gguf and not (directory / "config.json").is_file():
        fmt, status, detail = "gguf", "complete", ", ".join(gguf)
    elif (directory / "config.json").is_file():
        fmt = "safetensors"
        status, detail = _layer_status(directory)
    else:
        fmt, status, detail = "unknown", "incomplete", "no weights yet"
    if manifest is not None and status == "complete":
        missing = [name for name in manifest.files if not (directory / name).is_file()]
        if missing:
            status, detail = "partial", f"missing {', '.join(sorted(missing))}"
    return StoredModel(
        repo_id=manifest.repo_id if manifest else repo_id, path=directory, status=status, detail=detail,
        format=fmt, size_bytes=sum(f.stat().st_size for f in whole), incomplete_bytes=incomplete_bytes,
        read_only=read_only, gguf_files=gguf,
    )


def layers_on_disk(directory: Path) -> tuple[int, list[bool], bool, bool]:
    """(num_layers, whether each layer's tensors are all on disk, first-stage extras, last-stage extras)."""
    from ringlet.models.safetensors_loader import INDEX_FILE, tensor_in_range  # imports torch: only when needed

    config = _read_json(directory / "config.json")
    num_layers = int(config.get("num_hidden_layers", 0))
    tied = bool(config.get("tie_word_embeddings", False))
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = dict(_read_json(index).get("weight_map", {}))
    else:
        present = any(directory.glob("*.safetensors"))
        return num_layers, [present] * num_layers, present, present
    on_disk = {name: (directory / file).is_file() for name, file in weight_map.items()}
    layers = [all(ok for name, ok in on_disk.items() if tensor_in_range(name, i, i + 1, num_layers, False)
                  and name.startswith("model.layers.")) for i in range(num_layers)]
    first = all(ok for name, ok in on_disk.items() if not name.startswith("model.layers.")
                and tensor_in_range(name, 0, 1, num_layers, tied))
    last = all(ok for name, ok in on_disk.items() if not name.startswith("model.layers.")
               and tensor_in_range(name, num_layers - 1, num_layers, num_layers, tied))
    return num_layers, layers, first, last


def read_manifest(directory: Path) -> Manifest | None:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return Manifest.model_validate_json(path.read_text())
    except ValueError as e:
        raise ModelLoadError(f"{path} is damaged ({e}); delete it and run `ringlet pull` again") from None


def write_manifest(directory: Path, manifest: Manifest) -> None:
    path = directory / MANIFEST_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.model_dump_json(indent=1))
    os.replace(tmp, path)  # readers never see half a manifest


@contextlib.contextmanager
def model_lock(directory: Path, what: str = "download it") -> Iterator[None]:
    """Held while something writes into a model directory; a second writer fails at once, clearly."""
    lock_path = directory / LOCK_FILE
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise ModelLoadError(
            f"{directory} is being written by another download (lock {lock_path}); wait for it or cancel it, "
            f"then {what}"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _layer_status(directory: Path) -> tuple[StoreStatus, str]:
    try:
        num_layers, layers, first, last = layers_on_disk(directory)
    except ModelLoadError as e:
        return "incomplete", str(e)
    have = sum(layers)
    if num_layers and have == num_layers and first and last:
        return "complete", f"{num_layers}/{num_layers} layers"
    if have == 0:
        return "incomplete", "no weights yet"
    return "partial", f"layers {_ranges(layers)} of {num_layers}"


def _ranges(present: list[bool]) -> str:
    spans: list[str] = []
    start: int | None = None
    for i, ok in enumerate([*present, False]):
        if ok and start is None:
            start = i
        elif not ok and start is not None:
            spans.append(f"{start}-{i - 1}" if i - 1 > start else str(start))
            start = None
    return ", ".join(spans)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing; run `ringlet pull` again") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}); run `ringlet pull` again") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} should hold a JSON object")
    return data


def _subdirs(path: Path) -> list[Path]:
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _find_case_insensitive(base: Path, repo_id: str) -> Path | None:
    exact = base / repo_id
    if exact.is_dir():
        return exact
    org_name, model_name = repo_id.lower().split("/")
    for org in _subdirs(base):
        if org.name.lower() == org_name:
            for model in _subdirs(org):
                if model.name.lower() == model_name:
                    return model
    return None


def _quant_hint(filename: str) -> str:
    stem = Path(filename).stem
    return stem.rsplit(".", 1)[-1] if "." in stem else stem.rsplit("-", 1)[-1]
