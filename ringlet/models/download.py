"""Fetch a model from the Hugging Face Hub (or a mirror) into the local store.

Everything on the wire goes through huggingface_hub: `HfApi.model_info(files_metadata=True)` for the
file list with sizes and sha256, `hf_hub_url` + `http_get` for the bytes (Range resume, retries on a
dropped connection). We write into our own store rather than huggingface_hub's cache because:
- the cache is blobs + symlinked snapshots keyed by commit, which the loader, `ringlet models` and
  `ringlet rm` would all have to understand; the store is a plain model directory;
- huggingface_hub deletes a partial download when it fails (its temp names are per process), so a node
  restarted mid-way through a 16 GB file would start again from zero; we keep the partial bytes in
  `.ringlet/incomplete/` and resume them with a Range request;
- a file gets its final name only after its sha256 matched the hub's, never after a size check alone.

    path = download_model("Qwen/Qwen3-0.6B", layers=(0, 14), progress=print)
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx2
from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers
from pydantic import BaseModel

from ringlet.models.registry import supported_architectures
from ringlet.models.safetensors_loader import INDEX_FILE, named_weight_map, read_config, tensor_in_range
from ringlet.models.store import (
    INCOMPLETE_DIR,
    Manifest,
    ManifestFile,
    ModelRef,
    ModelStore,
    layers_on_disk,
    model_lock,
    pick_gguf,
    read_manifest,
    split_gguf_parts,
    write_manifest,
)
from ringlet.shared.errors import ModelLoadError
from ringlet.shared.saved import SavedList
from ringlet.shared.state import DownloadStatus, FileProgress

_log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
# What the loader and tokenizer read next to the weights (top-level files only).
SUPPORT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "chat_template.json", INDEX_FILE,
                 "modules.json", "1_Pooling/config.json")  # an embedding model's pooling (models/pooling.py)
_HASH_BLOCK = 8 * 1024 * 1024

LayerRange = tuple[int, int]
FreeSpace = Callable[[Path], int]


class DownloadError(ModelLoadError):
    """A download could not be done; the message names the model and what to do."""


class DownloadCancelled(DownloadError):
    """Stopped on request; finished files stay, partial ones resume next time."""


class NotEnoughDiskSpace(DownloadError):
    """Checked before any weights are fetched, against the bytes still missing."""


class HubUnreachable(DownloadError):
    """No answer from the hub (network down, DNS, proxy): what is on disk may still serve."""


class TooManyDownloads(DownloadError):
    """As many downloads run as a node takes at once; the message says how many and to try later."""


class DownloadProgress(BaseModel):
    """Bytes done/total, per file and overall; published into the cluster state by the node."""

    repo_id: str
    files: list[FileProgress]
    done: int
    total: int


ProgressCallback = Callable[[DownloadProgress], None]


@dataclass(frozen=True)
class HubSettings:
    endpoint: str = DEFAULT_ENDPOINT
    token: str | None = None  # None: huggingface_hub's own lookup (HF_TOKEN, then `hf auth login`)
    offline: bool = False

    @classmethod
    def from_env(cls, offline: bool | None = None) -> HubSettings:
        """Read HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE now, not when huggingface_hub was imported."""
        env_offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
        return cls(
            endpoint=(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
            token=os.environ.get("HF_TOKEN") or None,
            offline=env_offline if offline is None else offline,
        )


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None  # LFS files
    blob_id: str | None  # git blob sha1 of small files

    @property
    def partial_name(self) -> str:
        # keyed by content, so bytes of an older revision of the file are never resumed into a new one
        return f"{self.name}.{(self.sha256 or self.blob_id or 'unhashed')[:16]}.incomplete"


def disk_free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that will hold `path` (its nearest existing parent)."""
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    raise DownloadError(f"no existing parent directory for {path}")


def download_model(
    ref: str, *, layers: LayerRange | None = None, revision: str = "main", store: ModelStore | None = None,
    settings: HubSettings | None = None, max_workers: int = 4, progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None, free_space: FreeSpace = disk_free_bytes,
) -> Path:
    """Fetch what serving layers [start, end) of `ref` needs (all of it without `layers`); return its path.

    The path is the model directory, or the GGUF file for a GGUF repo (`org/name:QUANT` picks one).
    Offline, nothing is fetched: the path is returned if the store already holds what is needed.
    """
    parsed = ModelRef.parse(ref)
    store = store or ModelStore()
    settings = settings or HubSettings.from_env()
    on_disk = _usable_on_disk(store, parsed, layers, read_only_only=not settings.offline)
    if on_disk is not None:
        return on_disk
    if settings.offline:
        stored = store.get(parsed.repo_id)
        has = f"on disk has {stored.detail} ({stored.status})" if stored else \
            f"is not on disk (looked in {store.root} and RINGLET_MODEL_DIRS)"
        raise DownloadError(f"offline: {parsed} {has}, not what layers {_fmt_layers(layers)} need; "
                            f"run `ringlet pull {parsed}` with network access")
    try:
        repo_id, commit, remote = _model_files(parsed.repo_id, revision, settings)
    except HubUnreachable as e:
        # as huggingface_hub falls back to its cache: a node with the files keeps serving through an outage
        local = _usable_on_disk(store, parsed, layers, read_only_only=False)
        if local is None:
            raise
        _log.warning("%s; using the copy on disk at %s, unverified", e, local)
        return local
    directory = store.model_dir(repo_id)
    with model_lock(directory):
        fetcher = _Fetcher(repo_id, commit, directory, settings, max_workers, progress,
                           cancel or threading.Event(), free_space)
        safetensors = [n for n in remote if _is_weight_shard(n)]
        if safetensors:
            if "config.json" not in remote:
                raise DownloadError(f"{repo_id} has safetensors but no config.json: not a transformers model repo")
            fetcher.fetch([remote[n] for n in SUPPORT_FILES if n in remote])
            fetcher.fetch([remote[n] for n in _shards_for(directory, safetensors, layers)])
            return directory
        gguf = sorted(n for n in remote if n.endswith(".gguf"))
        if not gguf:
            raise DownloadError(f"{repo_id} has no safetensors or GGUF weights (files: {', '.join(sorted(remote))})")
        chosen = pick_gguf(gguf, parsed)
        parts = [str(part) for part in split_gguf_parts(Path(chosen))]
        absent = [part for part in parts if part not in remote]
        if absent:
            raise DownloadError(f"{repo_id}: {chosen} is one part of a split model whose parts "
                                f"{', '.join(absent)} are not in the repo")
        fetcher.fetch([remote[part] for part in parts])
        return directory / chosen


def fetch_config(ref: str, *, revision: str = "main", settings: HubSettings | None = None,
                 ) -> tuple[str, dict[str, Any], dict[str, int]]:
    """(canonical repo id, its config.json, the sizes of its files): what a model card needs, no weights.

    The config is read into memory (verified), not stored, so this never waits on a running download.
    """
    settings = settings or HubSettings.from_env()
    repo_id, commit, remote = _model_files(ModelRef.parse(ref).repo_id, revision, settings)
    config_file = remote.get("config.json")
    if config_file is None:
        raise DownloadError(f"{repo_id} has no config.json (a GGUF repo?); pull it: its card comes from the file")
    buffer = io.BytesIO()
    try:
        http_get(hf_hub_url(repo_id, "config.json", revision=commit, endpoint=settings.endpoint), buffer,
                 headers=build_hf_headers(token=settings.token), expected_size=config_file.size,
                 tqdm_class=_progress_hook(lambda _: None, lambda _: None))
    except GatedRepoError:
        raise DownloadError(_gated_message(repo_id, settings)) from None
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as e:
        raise DownloadError(f"cannot read config.json of {repo_id} from {settings.endpoint} ({_first_line(e)})") from e
    data = buffer.getvalue()
    if config_file.blob_id and _git_blob_sha1(data) != config_file.blob_id:
        raise DownloadError(f"config.json of {repo_id} does not match the hub's hash; check HF_ENDPOINT")
    try:
        config = json.loads(data)
    except json.JSONDecodeError as e:
        raise DownloadError(f"config.json of {repo_id} is not valid JSON ({e})") from None
    return repo_id, config, {name: f.size for name, f in remote.items()}


class _Fetcher:
    """Fetches files of one repo commit in parallel into one model directory, verifying each."""

    def __init__(self, repo_id: str, commit: str, directory: Path, settings: HubSettings, max_workers: int,
                 progress: ProgressCallback | None, cancel: threading.Event, free_space: FreeSpace) -> None:
        self.repo_id, self.commit, self.directory, self.settings = repo_id, commit, directory, settings
        self.max_workers, self.progress, self.cancel, self.free_space = max_workers, progress, cancel, free_space
        self.stop = threading.Event()  # cancel, or another file failed
        self.lock = threading.Lock()
        self.done: dict[str, int] = {}
        self.total: dict[str, int] = {}
        old = read_manifest(directory)
        self.manifest = old if old is not None and old.commit == commit else Manifest(
            repo_id=repo_id, commit=commit, endpoint=settings.endpoint,
            files={name: f for name, f in (old.files if old else {}).items() if (directory / name).is_file()})

    def fetch(self, files: list[RemoteFile]) -> None:
        for f in files:
            self.set_progress(f.name, 0, f.size, notify=False)
        missing = [f for f in files if not self._already_here(f)]
        self._notify()
        needed = sum(f.size - _partial_size(self.directory / INCOMPLETE_DIR / f.partial_name, f.size) for f in missing)
        free = self.free_space(self.directory)
        if needed > free:
            raise NotEnoughDiskSpace(
                f"not enough disk space for {self.repo_id}: {len(missing)} file(s) need {_gb(needed)}, "
                f"{self.directory} has {_gb(free)} free; free up space or set RINGLET_HOME to a larger disk"
            )
        if not missing:
            return
        self.stop.clear()
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(missing)), thread_name_prefix="download") as pool:
            futures = [pool.submit(self._fetch_one, f) for f in missing]
            finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.exception() for f in finished):
                self.stop.set()  # the others stop at their next chunk
        errors = [e for e in (f.exception() for f in futures) if e is not None]
        if errors:
            # a real failure explains more than the cancellations it caused in the other threads
            raise next((e for e in errors if not isinstance(e, DownloadCancelled)), errors[0])

    def _already_here(self, f: RemoteFile) -> bool:
        path = self.directory / f.name
        if not path.is_file():
            return False
        recorded = self.manifest.files.get(f.name)
        stat = path.stat()
        if stat.st_size == f.size and recorded is not None and recorded.verified_mtime_ns == stat.st_mtime_ns \
                and (recorded.sha256, recorded.blob_id) == (f.sha256, f.blob_id):
            self.set_progress(f.name, f.size, f.size, notify=False)
            return True
        if stat.st_size == f.size and _hash_matches(path, f):
            self._record(f, path)
            self.set_progress(f.name, f.size, f.size, notify=False)
            return True
        _log.warning("%s/%s on disk does not match the hub's size or sha256; fetching it again", self.repo_id, f.name)
        path.unlink()
        return False

    def _fetch_one(self, f: RemoteFile) -> None:
        self.check_stop()
        partial = self.directory / INCOMPLETE_DIR / f.partial_name
        partial.parent.mkdir(parents=True, exist_ok=True)
        for stale in partial.parent.glob(f"{f.name}.*.incomplete"):
            if stale != partial:
                stale.unlink()  # bytes of another revision of this file
        resumed = _partial_size(partial, f.size)
        self._download(f, partial, resumed)
        if not _hash_matches(partial, f):
            partial.unlink()
            if not resumed:
                raise DownloadError(f"{self.repo_id}/{f.name}: sha256 does not match the hub's after download; "
                                    "the mirror or a proxy altered it; try again or check HF_ENDPOINT")
            _log.warning("%s/%s: resumed bytes were damaged; downloading the file again", self.repo_id, f.name)
            self._download(f, partial, 0)
            if not _hash_matches(partial, f):
                partial.unlink()
                raise DownloadError(f"{self.repo_id}/{f.name}: sha256 does not match the hub's; try again")
        final = self.directory / f.name
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, final)  # atomic: the final name appears only for a whole, verified file
        self._record(f, final)

    def _download(self, f: RemoteFile, partial: Path, resume: int) -> None:
        url = hf_hub_url(self.repo_id, f.name, revision=self.commit, endpoint=self.settings.endpoint)
        headers = build_hf_headers(token=self.settings.token)
        if resume:
            _log.info("resuming %s/%s at %s of %s", self.repo_id, f.name, _gb(resume), _gb(f.size))
        try:
            with open(partial, "r+b" if resume else "wb") as out:
                out.seek(resume)
                out.truncate()
                hook = _progress_hook(lambda initial: self.set_progress(f.name, initial, f.size),
                                      lambda n: self.advance(f.name, n))
                http_get(url, out, resume_size=resume, headers=headers, expected_size=f.size,
                         displayed_filename=f.name, tqdm_class=hook)
                out.flush()
                os.fsync(out.fileno())
        except DownloadCancelled:
            raise
        except GatedRepoError:  # the hub lists a gated repo's files to anyone, but serves them only with a token
            raise DownloadError(_gated_message(self.repo_id, self.settings)) from None
        except (HfHubHTTPError, httpx2.HTTPError, OSError) as e:
            raise DownloadError(
                f"downloading {self.repo_id}/{f.name} from {self.settings.endpoint} failed ({_first_line(e)}); "
                f"run the same command again to resume"
            ) from e

    def _record(self, f: RemoteFile, path: Path) -> None:
        with self.lock:
            self.manifest.files[f.name] = ManifestFile(size=f.size, sha256=f.sha256, blob_id=f.blob_id,
                                                       verified_mtime_ns=path.stat().st_mtime_ns)
            write_manifest(self.directory, self.manifest)
        self.set_progress(f.name, f.size, f.size)

    def check_stop(self) -> None:
        if self.cancel.is_set() or self.stop.is_set():
            raise DownloadCancelled(f"download of {self.repo_id} cancelled; run it again to resume")

    def set_progress(self, name: str, done: int, total: int, notify: bool = True) -> None:
        with self.lock:
            self.done[name], self.total[name] = done, total
        if notify:
            self._notify()

    def advance(self, name: str, n: int) -> None:
        self.check_stop()  # between chunks: the cancel point
        with self.lock:
            self.done[name] = max(0, self.done.get(name, 0) + n)
        self._notify()

    def _notify(self) -> None:
        if self.progress is None:
            return
        with self.lock:
            files = [FileProgress(name=n, done=self.done[n], total=self.total[n]) for n in self.total]
        self.progress(DownloadProgress(repo_id=self.repo_id, files=files, done=sum(f.done for f in files),
                                       total=sum(f.total for f in files)))


def _progress_hook(on_start: Callable[[int], None], on_chunk: Callable[[int], None]) -> type:
    """A stand-in for the tqdm class that huggingface_hub's `http_get` drives: it is told how many bytes
    were already there, then of every chunk before that chunk is written, so `on_chunk` may raise to
    stop the download and leave a clean prefix in the partial file."""

    class ChunkHook:
        def __init__(self, **bar: Any) -> None:
            on_start(int(bar.get("initial") or 0))

        def update(self, n: float | None = 1) -> None:
            on_chunk(int(n or 0))

        def close(self) -> None:
            return None

        def __enter__(self) -> Self:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    return ChunkHook


def _model_files(repo_id: str, revision: str, settings: HubSettings) -> tuple[str, str, dict[str, RemoteFile]]:
    """(canonical repo id, commit sha, top-level files and the nested SUPPORT_FILES, with size and hashes) from
    the hub."""
    api = HfApi(endpoint=settings.endpoint, token=settings.token)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except GatedRepoError:
        raise DownloadError(_gated_message(repo_id, settings)) from None
    except RepositoryNotFoundError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise DownloadError(f"model {repo_id!r} not found at {settings.endpoint} (HTTP {status}): check the name "
                            "(ORG/NAME as on its page); for a private model set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise DownloadError(f"{repo_id} has no revision {revision!r} at {settings.endpoint}") from None
    except OfflineModeIsEnabled:
        raise DownloadError(f"huggingface_hub is in offline mode (HF_HUB_OFFLINE was set when it was imported); "
                            f"restart without it to download {repo_id}") from None
    except httpx2.TransportError as e:
        raise HubUnreachable(f"cannot reach {settings.endpoint} for {repo_id} ({_first_line(e)}); check the network "
                             "and HF_ENDPOINT, or use --offline for what is on disk") from None
    except HfHubHTTPError as e:
        raise DownloadError(f"cannot get the file list of {repo_id} from {settings.endpoint} ({_first_line(e)}); "
                            "check HF_ENDPOINT and HF_TOKEN") from None
    if not info.sha or info.siblings is None:
        raise DownloadError(f"{settings.endpoint} answered without a commit or file list for {repo_id}; "
                            "is HF_ENDPOINT a Hugging Face Hub mirror?")
    files = {
        s.rfilename: RemoteFile(s.rfilename, int(s.lfs.size if s.lfs else s.size or 0),
                                s.lfs.sha256 if s.lfs else None, None if s.lfs else s.blob_id)
        for s in info.siblings if "/" not in s.rfilename or s.rfilename in SUPPORT_FILES
    }
    return info.id or repo_id, info.sha, files


def _gated_message(repo_id: str, settings: HubSettings) -> str:
    return (f"{repo_id} is gated: accept its licence at {settings.endpoint}/{repo_id} and set HF_TOKEN to a "
            "token of that account")


def _shards_for(directory: Path, shards: list[str], layers: LayerRange | None) -> list[str]:
    """The safetensors files that hold layers [start, end) (and the embedding/head that stage needs)."""
    config = read_config(directory)
    if config.get("model_type") not in supported_architectures():
        return sorted(shards)  # a model only mlx-lm runs: its tensors' names are its own, so every file is fetched
    num_layers = int(config.get("num_hidden_layers", 0))
    start, end = layers or (0, num_layers)
    if not 0 <= start < end <= num_layers:
        raise DownloadError(f"layers {start}:{end} are outside the model's 0:{num_layers}")
    if not (directory / INDEX_FILE).is_file():
        # no index: the weights are in one file (or a few whose contents we cannot tell apart unread)
        return sorted(shards)
    tied = bool(config.get("tie_word_embeddings", False))
    return sorted({file for name, file in named_weight_map(directory).items()
                   if tensor_in_range(name, start, end, num_layers, tied)})


def _usable_on_disk(store: ModelStore, ref: ModelRef, layers: LayerRange | None, read_only_only: bool) -> Path | None:
    """The stored path when it already has everything a stage of `layers` needs (no network).

    Online, only read-only extra directories count (the writable store is re-checked against the hub).
    """
    model = store.get(ref.repo_id)
    if model is None or (read_only_only and not model.read_only):
        return None
    if model.format == "gguf":
        return model.path / pick_gguf(model.gguf_files, ref)
    if model.format != "safetensors" or not (model.path / "tokenizer.json").is_file():
        return None
    num_layers, present, first, last = layers_on_disk(model.path)
    start, end = layers or (0, num_layers)
    if 0 <= start < end <= num_layers and all(present[start:end]) and (first or start > 0) \
            and (last or end < num_layers):
        return model.path
    return None


def _is_weight_shard(name: str) -> bool:
    # Mistral repos also carry consolidated.safetensors (the mistral-inference layout): not ours
    return name.endswith(".safetensors") and not name.startswith("consolidated")


def _partial_size(path: Path, expected: int) -> int:
    size = path.stat().st_size if path.is_file() else 0
    return size if size <= expected else 0


def _hash_matches(path: Path, f: RemoteFile) -> bool:
    if f.sha256:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(_HASH_BLOCK):
                digest.update(block)
        return digest.hexdigest() == f.sha256
    if f.blob_id:
        return _git_blob_sha1(path.read_bytes()) == f.blob_id  # only small files are kept in git, not LFS
    return path.stat().st_size == f.size


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _fmt_layers(layers: LayerRange | None) -> str:
    return "all" if layers is None else f"{layers[0]}:{layers[1]}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


class SavedDownload(BaseModel):
    """A download not yet finished, as the node keeps it to resume after a restart (`ringlet/shared/saved.py`)."""

    download_id: str
    model: str
    layers: LayerRange | None = None
    revision: str = "main"


class DownloadManager:
    """Downloads running in background threads, for the node's API: start, status, cancel.

    `on_update` gets every change of state and, at most every `publish_interval` seconds, progress:
    the node turns it into a cluster event so `/state` shows bytes done/total per node. With `saved`, a download
    is kept there from its start until it ends (done, failed or cancelled by the user; not when the manager
    closes), and `resume()` starts again those a previous process left: their partial files go on where they
    stopped.
    """

    def __init__(self, store: ModelStore | None = None, *, on_update: Callable[[DownloadStatus], None] | None = None,
                 settings: Callable[[], HubSettings] = HubSettings.from_env, max_workers: int = 4,
                 free_space: FreeSpace = disk_free_bytes, publish_interval: float = 0.5, max_running: int = 2,
                 keep_finished: int = 50, saved: SavedList[SavedDownload] | None = None) -> None:
        """`max_running` downloads at once (more: TooManyDownloads); the last `keep_finished` finished ones are
        remembered, older ones forgotten."""
        self.store, self.on_update, self.settings, self.saved = store, on_update, settings, saved
        self.closing = False  # close() was called: downloads stopping now are resumed later
        self.max_running, self.keep_finished = max_running, keep_finished
        self.max_workers, self.free_space, self.publish_interval = max_workers, free_space, publish_interval
        self._lock = threading.Lock()
        self._statuses: dict[str, DownloadStatus] = {}
        self._cancels: dict[str, threading.Event] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._published_at: dict[str, float] = {}
        self._held: dict[str, threading.Timer] = {}  # progress waiting for its publish interval to end
        self._publish_lock = threading.Lock()

    def start(self, model: str, layers: LayerRange | None = None, revision: str = "main",
              download_id: str | None = None) -> DownloadStatus:
        """Begin (or join the running) download of `model`; a bad name fails here, not in the thread.
        `download_id`: the id it had before a restart (default: a new one)."""
        ref = ModelRef.parse(model)
        with self._lock:
            for status in self._statuses.values():
                if status.state == "running" and status.model.lower() == str(ref).lower() and status.layers == layers:
                    return status
            running = sum(1 for s in self._statuses.values() if s.state == "running")
            if running >= self.max_running:
                raise TooManyDownloads(f"{running} downloads are running on this node, the most it runs at once; "
                                       "try again when one has finished (GET /models/downloads)")
            self._forget_finished()
            download_id = download_id or uuid.uuid4().hex[:12]
            status = DownloadStatus(download_id=download_id, model=str(ref), layers=layers)
            self._statuses[download_id] = status
            self._cancels[download_id] = threading.Event()
            thread = threading.Thread(target=self._run, args=(download_id, revision), daemon=True,
                                      name=f"download-{download_id}")
            self._threads[download_id] = thread
        if self.saved is not None:
            self.saved.remove(download_id)
            self.saved.add(SavedDownload(download_id=download_id, model=str(ref), layers=layers, revision=revision))
        self._publish(download_id, force=True)
        thread.start()
        return status

    def resume(self) -> list[DownloadStatus]:
        """Start again the downloads a previous process left unfinished; one that cannot start is forgotten, with
        a warning saying why."""
        if self.saved is None:
            return []
        resumed = []
        for saved in self.saved.load():
            try:
                resumed.append(self.start(saved.model, saved.layers, saved.revision, saved.download_id))
            except DownloadError as error:
                _log.warning("the unfinished download %s of %s was not resumed, and is forgotten: %s",
                             saved.download_id, saved.model, error)
                self.saved.remove(saved.download_id)
            else:
                _log.info("resuming the download %s of %s", saved.download_id, saved.model)
        return resumed

    def _forget_finished(self) -> None:
        """Keep the last `keep_finished` finished downloads (under the lock)."""
        finished = [i for i, s in self._statuses.items() if s.state != "running"]
        for download_id in finished[:max(0, len(finished) - self.keep_finished)]:
            del self._statuses[download_id]
            self._cancels.pop(download_id, None)
            self._threads.pop(download_id, None)
            self._published_at.pop(download_id, None)

    def status(self, download_id: str) -> DownloadStatus:
        with self._lock:
            if download_id not in self._statuses:
                raise DownloadError(f"no download with id {download_id!r}; known: {', '.join(self._statuses) or 'none'}")
            return self._statuses[download_id]

    def statuses(self) -> list[DownloadStatus]:
        with self._lock:
            return list(self._statuses.values())

    def cancel(self, download_id: str) -> DownloadStatus:
        """Ask a download to stop; it does so within one chunk. Its finished files stay on disk."""
        status = self.status(download_id)
        self._cancels[download_id].set()
        return status

    def wait(self, download_id: str, timeout: float | None = None) -> DownloadStatus:
        self.status(download_id)
        self._threads[download_id].join(timeout)
        return self.status(download_id)

    def close(self, timeout: float = 10.0) -> None:
        """Stop every running download (kept in `saved`, to resume) and wait for the threads to stop."""
        self.closing = True
        for event in self._cancels.values():
            event.set()
        for thread in list(self._threads.values()):
            thread.join(timeout)

    def _run(self, download_id: str, revision: str) -> None:
        status = self.status(download_id)
        try:
            path = download_model(
                status.model, layers=status.layers, revision=revision, store=self.store, settings=self.settings(),
                max_workers=self.max_workers, free_space=self.free_space, cancel=self._cancels[download_id],
                progress=lambda p: self._update(download_id, done=p.done, total=p.total, files=p.files),
            )
        except DownloadCancelled as e:
            self._update(download_id, state="cancelled", error=str(e))
            if self.closing:
                return  # stopped with the node, not by the user: kept to resume
        except ModelLoadError as e:  # DownloadError and the store's errors: each says what to do
            self._update(download_id, state="failed", error=str(e))
        except Exception as e:  # noqa: BLE001 - a thread's boundary: report it rather than stay "running" forever
            _log.exception("download %s of %s failed", download_id, status.model)
            self._update(download_id, state="failed", error=f"unexpected error: {e!r}")
        else:
            self._update(download_id, state="done", path=str(path))
        if self.saved is not None:
            self.saved.remove(download_id)

    def _update(self, download_id: str, **changes: Any) -> None:
        with self._lock:
            status = self._statuses[download_id].model_copy(update=changes)
            self._statuses[download_id] = status
        self._publish(download_id, force="state" in changes)

    def _publish(self, download_id: str, force: bool = False) -> None:
        """Hand the download's latest status to `on_update`: every change of state at once, progress at most every
        `publish_interval` seconds. Progress held back goes when its interval ends, so the last one always reaches
        the state; one at a time, so an older status never follows a newer one."""
        if self.on_update is None:
            return
        with self._publish_lock:
            now = time.monotonic()
            last = self._published_at.get(download_id)
            wait = 0.0 if force or last is None else self.publish_interval - (now - last)
            if wait > 0:
                if download_id not in self._held:
                    held = threading.Timer(wait, self._publish, args=(download_id, True))
                    held.daemon = True
                    self._held[download_id] = held
                    held.start()
                return
            waiting = self._held.pop(download_id, None)
            if waiting is not None:
                waiting.cancel()  # this publish sends what it held
            self._published_at[download_id] = now
            with self._lock:
                status = self._statuses.get(download_id)
            if status is not None:
                self.on_update(status)
