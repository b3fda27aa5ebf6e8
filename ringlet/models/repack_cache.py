"""A GGUF file's weights as a stage keeps them, cached on disk beside the store so that a second load skips decoding.

Each layer's groups (`GroupQuantized`: 4-bit codes two to a byte, 5-bit ones a byte each) are one safetensors file,
`ringlet_home()/cache/gguf/<file>/blk.<i>.safetensors`, written atomically (a temporary file, then a rename) and read
back with safetensors. An entry records the size and mtime of the GGUF file (of each part of a split one), the name
and type of each tensor, and a CRC-32 of each stored tensor's bytes: an entry that does not match them (a bit that
flipped on disk), does not read, or holds a scale that is not finite, is a miss, and is written again. `ringlet rm`
removes a model's entries with it. `RINGLET_GGUF_CACHE=0` turns the cache off; a cache directory that cannot be
written turns it off for the load, with one log line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from ringlet.models.gguf_quants import GROUPED5_TYPES
from ringlet.models.quant import GroupQuantized
from ringlet.models.store import ringlet_home

log = logging.getLogger(__name__)

ENV_SWITCH = "RINGLET_GGUF_CACHE"
FIVE_BIT_TYPES = frozenset(kind.name for kind in GROUPED5_TYPES)  # GGML types whose codes are stored a byte each
_PARTS = ("codes", "scale", "offset")


class RepackCache:
    """Entries of one GGUF model: `read(entry, tensors)` and `write(entry, tensors, groups)`, where `tensors` maps each
    GGUF tensor name of the entry to its GGML type name."""

    def __init__(self, directory: Path, source: str) -> None:
        self.directory = directory
        self._source = source  # what the entries must have been made from
        self._writable = True

    @classmethod
    def for_files(cls, files: Sequence[Path], home: Path | None = None) -> RepackCache | None:
        """The cache of the model in `files` (its parts, the first first), or None where `RINGLET_GGUF_CACHE=0`."""
        if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
            return None
        stats = [(str(f.resolve()), f.stat()) for f in files]
        source = json.dumps([[name, stat.st_size, stat.st_mtime_ns] for name, stat in stats])
        return cls(cache_directory(files[0], home), source)

    def _path(self, entry: str) -> Path:
        return self.directory / f"{entry}.safetensors"

    def _metadata(self, tensors: Mapping[str, str]) -> dict[str, str]:
        return {"source": self._source, "tensors": json.dumps(sorted(tensors.items())),
                "codes": "4-bit in nibble pairs, 5-bit a byte each"}

    def read(self, entry: str, tensors: Mapping[str, str]) -> dict[str, GroupQuantized] | None:
        """The entry's groups by GGUF tensor name, or None where it is missing, stale or unreadable."""
        path = self._path(entry)
        if not path.is_file():
            return None
        try:
            # read whole (one layer's worth): tensors of their own, not views of a map that would stay resident
            data = path.read_bytes()
            header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
            metadata = dict(header.get("__metadata__") or {})
            checksums = json.loads(metadata.pop("crc32", "null"))
            if metadata != self._metadata(tensors):
                return None
            stored = load(data)
            if checksums != _checksums(stored):
                log.info("GGUF repack cache entry %s does not match its checksums; decoding the file again", path)
                return None
            groups = {name: _groups(stored, name, kind in FIVE_BIT_TYPES) for name, kind in tensors.items()}
        except (OSError, SafetensorError, ValueError, KeyError, RuntimeError) as e:
            log.info("GGUF repack cache entry %s does not read (%s); decoding the file again", path, e)
            return None
        if not all(_well_formed(g) for g in groups.values()):
            log.info("GGUF repack cache entry %s holds malformed groups; decoding the file again", path)
            return None
        return groups

    def write(self, entry: str, tensors: Mapping[str, str], groups: Mapping[str, GroupQuantized]) -> None:
        if not self._writable:
            return
        flat = {f"{name}.{part}": (_paired(g.codes) if part == "codes" and g.bits == 4 else getattr(g, part))
                .contiguous() for name, g in groups.items() for part in _PARTS}
        path = self._path(entry)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            metadata = {**self._metadata(tensors), "crc32": json.dumps(_checksums(flat))}
            save_file(flat, str(temporary), metadata=metadata)
            os.replace(temporary, path)
        except (OSError, SafetensorError) as e:
            self._writable = False
            log.warning("cannot write the GGUF repack cache in %s (%s); loading without it", self.directory, e)
            with contextlib.suppress(OSError):  # nothing to remove where the directory could not be made
                temporary.unlink()


def cache_root(home: Path | None = None) -> Path:
    """The folder of every GGUF model's entries."""
    return (home or ringlet_home()) / "cache" / "gguf"


def cache_directory(first: Path, home: Path | None = None) -> Path:
    """Where the entries of the GGUF model whose (first) file is `first` are kept."""
    resolved = first.resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    return cache_root(home) / f"{resolved.name}-{digest}"


def size_of(directory: Path) -> int:
    """The bytes of the files under `directory` (0 where there is none)."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else 0


def _remove(directory: Path) -> int:
    freed = size_of(directory)
    shutil.rmtree(directory, ignore_errors=True)
    return freed


def forget(files: Sequence[Path], home: Path | None = None) -> int:
    """Remove the entries made from the GGUF files `files` (a model about to be removed: they are resolved as the
    cache resolved them); returns the bytes they took."""
    return sum(_remove(directory) for directory in {cache_directory(f, home) for f in files})


def clear(home: Path | None = None) -> int:
    """Remove every model's entries (those of files since deleted too); returns the bytes they took. A load makes a
    model's entries again."""
    return _remove(cache_root(home))


def _checksums(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """CRC-32 of each tensor's bytes, by name."""
    return {name: zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            for name, t in sorted(tensors.items())}


def _groups(stored: Mapping[str, torch.Tensor], name: str, five_bit: bool) -> GroupQuantized:
    codes = stored[f"{name}.codes"]
    if not five_bit:
        codes = _unpaired(codes)
    elif codes.dtype != torch.uint8 or codes.dim() != 2 or int(codes.max()) > 31:
        raise ValueError(f"5-bit codes of dtype {codes.dtype}, shape {tuple(codes.shape)}")
    return GroupQuantized(codes, stored[f"{name}.scale"], stored[f"{name}.offset"], bits=5 if five_bit else 4)


def _paired(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] stored two to a byte, [N, K / 2]: the even one in the low nibble."""
    pairs = codes.view(codes.shape[0], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def _unpaired(stored: torch.Tensor) -> torch.Tensor:
    if stored.dtype != torch.uint8 or stored.dim() != 2:
        raise ValueError(f"codes of dtype {stored.dtype} and shape {tuple(stored.shape)}")
    return torch.stack((stored & 0x0F, stored >> 4), dim=-1).view(stored.shape[0], -1)


def _well_formed(groups: GroupQuantized) -> bool:
    codes, scale, offset = groups.codes, groups.scale, groups.offset
    return (codes.dtype == torch.uint8 and scale.dtype == offset.dtype == torch.float32 and codes.dim() == 2
            and scale.shape == offset.shape == (codes.shape[0], codes.shape[1] // groups.group_size)
            and bool(torch.isfinite(scale).all()) and bool(torch.isfinite(offset).all()))
