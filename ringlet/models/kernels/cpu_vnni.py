"""Weight-only int4, int5 and int8 products of few rows on x86 CPUs with AVX-512 VNNI (`cpu_vnni.cpp`): what an
Int4Linear (4- or 5-bit codes) and an Int8Linear run for decode steps and short chunks (an Int8Linear whose codes a
tied embedding shares: for a one-sequence decode step).

PyTorch's CPU kernels (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`) multiply in floating point, one
weight at a time. These round x to int8 per block of 32 values (as llama.cpp does) and sum 64 products an
instruction. The tiled kernels (int4, int5, int8: 16 output rows a tile, one int32 lane a row, so no horizontal
sums) are faster at every number of rows up to where a dense matmul takes over; the one-row int8 kernel, a dot
product a row, at one row only (`scripts/bench_cpu_kernels.py`; docs/benchmarks.md has the numbers).

The ops are compiled on the machine that runs them (`-march=native`, through torch.utils.cpp_extension: g++ and
ninja), once, into torch's extensions cache (~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR), which rebuilds
them when the source changes. Where the CPU lacks AVX-512 VNNI, the build fails or RINGLET_CPU_VNNI=0,
`available()` is False and the linears keep PyTorch's kernels.

`torch.ops.ringlet_cpu.int4_linear(x [M, K], tiles uint8 [N / 16, K * 8], scale_zero bf16 [K / group, N, 2],
group)` (`tile_int4` makes the tiles; scale_zero as Int4Linear keeps it for PyTorch's kernel),
`torch.ops.ringlet_cpu.int5_linear(x, tiles, high uint8 [N / 16, K * 2], scale_zero, group)` (5-bit codes: GGUF's Q5
types; `tile_int5` makes tiles and high),
`torch.ops.ringlet_cpu.int8_tiled_linear(x, tiles uint8 [N / 16, K * 16], scales [N])` (`tile_int8`) and
`torch.ops.ringlet_cpu.int8_linear(x [M, K], codes int8 [N, K], scales [N])`, all -> [M, N] in x's dtype; fake
implementations let torch.compile keep them whole in a compiled step.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch

from ringlet.models.kernels import CPU_KERNEL_FLAGS

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_vnni.cpp")
loaded = False  # whether the ops are registered in this process (set by `available`): what compiled steps read
NEEDED_FLAGS = CPU_KERNEL_FLAGS


def cpu_flags() -> set[str]:
    """The flags of this machine's CPU (Linux), or none elsewhere: what the model layer reads of /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def wanted() -> bool:
    """Whether this process would use the ops (the CPU has their flags; RINGLET_CPU_VNNI is not 0), without building
    them."""
    return os.environ.get("RINGLET_CPU_VNNI", "1") != "0" and set(NEEDED_FLAGS) <= cpu_flags()


@functools.cache
def available() -> bool:
    """Whether the ops are loaded (building them on a machine's first call: some 20 s on 2 cores, then cached)."""
    if os.environ.get("RINGLET_CPU_VNNI", "1") == "0":
        return False
    missing = [flag for flag in NEEDED_FLAGS if flag not in cpu_flags()]
    if missing:
        log.info("PyTorch's CPU kernels used: this CPU lacks %s", ", ".join(missing))
        return False
    from torch.utils import cpp_extension

    _find_ninja()
    try:
        # one build per PyTorch version (the IPEX environment's differs: a library built against another would not
        # load) and per source (checkouts of different versions side by side do not rebuild each other's)
        digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:10]
        version = re.sub(r"\W", "_", torch.__version__)
        name = f"ringlet_cpu_vnni_{version}_{digest}"
        _drop_stale_lock(Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock")
        cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    # any failure (no compiler, no ninja, a compiler without these intrinsics) keeps PyTorch's kernels
    except Exception as error:  # noqa: BLE001
        log.warning("ringlet's VNNI kernels were not built, PyTorch's are used: %s: %s", type(error).__name__,
                    str(error).splitlines()[0] if str(error) else "")
        return False

    @torch.library.register_fake("ringlet_cpu::int8_linear")
    def _(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], codes.shape[0])

    @torch.library.register_fake("ringlet_cpu::decode_attention")
    def _(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, visible: torch.Tensor,
          scale: float) -> torch.Tensor:
        return q.new_empty(q.shape)

    @torch.library.register_fake("ringlet_cpu::int4_linear")
    def _(x: torch.Tensor, tiles: torch.Tensor, scale_zero: torch.Tensor, group: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], tiles.shape[0] * TILE_ROWS)

    @torch.library.register_fake("ringlet_cpu::int8_tiled_linear")
    def _(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], tiles.shape[0] * TILE_ROWS)

    @torch.library.register_fake("ringlet_cpu::int5_linear")
    def _(x: torch.Tensor, tiles: torch.Tensor, high: torch.Tensor, scale_zero: torch.Tensor, group: int
          ) -> torch.Tensor:
        return x.new_empty(x.shape[0], tiles.shape[0] * TILE_ROWS)

    global loaded
    loaded = True
    return True


TILE_ROWS = 16  # output rows of an int4 tile


def takes_int4(n: int, k: int, group: int) -> bool:
    """Whether the int4 op can run a weight [n, k] in groups of `group` (on a CPU that has it)."""
    return n % TILE_ROWS == 0 and k % group == 0 and group % 32 == 0 and available()


def tile_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [N, K] (0..15) -> the int4 op's tiles, uint8 [N / 16, K * 8]: per tile of 16 rows, per 8 columns,
    64 bytes, 4 a row; byte j of a row holds column j in its low nibble and column j + 4 in its high one."""
    n, k = codes.shape
    octets = codes.view(n // TILE_ROWS, TILE_ROWS, k // 8, 2, 4).permute(0, 2, 1, 3, 4)
    return (octets[..., 0, :] | (octets[..., 1, :] << 4)).reshape(n // TILE_ROWS, k * 8)


def untile_int4(tiles: torch.Tensor) -> torch.Tensor:
    """`tile_int4` undone: codes uint8 [N, K]."""
    count, width = tiles.shape
    k = width // 8
    octets = tiles.view(count, k // 8, TILE_ROWS, 1, 4)
    codes = torch.cat((octets & 0x0F, octets >> 4), dim=3)  # [tiles, K / 8, 16, 2, 4]
    return codes.permute(0, 2, 1, 3, 4).reshape(count * TILE_ROWS, k)


def takes_int8_tiles(n: int, k: int) -> bool:
    """Whether the int8 tile op can run a weight [n, k] (on a CPU that has it)."""
    return n % TILE_ROWS == 0 and k % 32 == 0 and available()


def tile_int8(codes: torch.Tensor) -> torch.Tensor:
    """Codes int8 [N, K] -> the int8 tile op's tiles, uint8 [N / 16, K * 16]: per tile of 16 rows, per 4 columns, 64
    bytes, 4 a row, each code + 128."""
    n, k = codes.shape
    shifted = (codes.to(torch.int16) + 128).to(torch.uint8)  # 4 columns of a row are one int32 (moved whole, faster)
    words = shifted.view(torch.int32).view(n // TILE_ROWS, TILE_ROWS, k // 4).transpose(1, 2)
    return words.contiguous().view(torch.uint8).view(n // TILE_ROWS, k * 16)


def untile_int8(tiles: torch.Tensor, shifted: bool = False) -> torch.Tensor:
    """`tile_int8` undone: codes int8 [N, K] (`shifted`: the codes + 128 as they are stored, uint8)."""
    count, width = tiles.shape
    k = width // 16
    words = tiles.view(torch.int32).view(count, k // 4, TILE_ROWS).transpose(1, 2)
    stored = words.contiguous().view(torch.uint8).view(count * TILE_ROWS, k)
    return stored if shifted else (stored.to(torch.int16) - 128).to(torch.int8)


def tile_int5(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes uint8 [N, K] (0..31) -> the int5 op's (tiles, high): `tile_int4` of their low 4 bits, and uint8
    [N / 16, K * 2] of fifth bits, per tile, per 8 columns, 16 bytes: a 64-bit mask for each of the octet's two
    64-byte vectors of `tile_int4` (its low nibbles, then its high ones), bit b for the vector's byte b."""
    n, k = codes.shape
    fifth = (codes >> 4).view(n // TILE_ROWS, TILE_ROWS, k // 8, 2, 4).permute(0, 2, 3, 1, 4)  # [tiles, K/8, 2, 16, 4]
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
    marks = (fifth.reshape(-1, 8) * weights).sum(-1, dtype=torch.uint8)  # byte i of a mask: its bits 8i..8i+7
    return tile_int4(codes & 0x0F), marks.view(n // TILE_ROWS, k * 2)


def untile_int5(tiles: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """`tile_int5` undone: codes uint8 [N, K]."""
    count, width = tiles.shape
    k = width // 8
    bits = (high.view(-1, 1) >> torch.arange(8, dtype=torch.uint8, device=high.device)) & 1  # [.., 8 bytes, 8 bits]
    fifth = bits.view(count, k // 8, 2, TILE_ROWS, 4).permute(0, 3, 1, 2, 4).reshape(count * TILE_ROWS, k)
    return untile_int4(tiles) | (fifth << 4)


def takes_attention(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether the attention op can run queries q [T, H, D] over a paged cache's keys [slots, KV, D]: once the ops are
    loaded (`available`, which a CPU engine calls as it starts; a compiled step cannot call it)."""
    return (loaded and q.device.type == "cpu" and q.dtype == keys.dtype and q.dtype in (torch.bfloat16, torch.float32)
            and q.shape[-1] % 16 == 0)


STALE_LOCK_S = 600  # a build takes some 20 s; a lock this old was left by a process killed while building


def _drop_stale_lock(lock: Path) -> None:
    """torch.utils.cpp_extension waits for its build lock without end: one left by a killed process would hang
    every later start."""
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            log.warning("removing %s, left by a build that did not finish", lock)
            lock.unlink()
    except FileNotFoundError:
        return


def _find_ninja() -> None:
    """Put the ninja of the `ninja` package on PATH where none is there: a venv's bin directory is on PATH only when
    the venv is activated, and torch.utils.cpp_extension looks for `ninja` there."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = os.pathsep.join((ninja.BIN_DIR, os.environ.get("PATH", "")))


def takes(codes: torch.Tensor) -> bool:
    """Whether the op can run these int8 codes [N, K] (on a CPU that has it): K a multiple of 32, no -128."""
    return (codes.device.type == "cpu" and codes.shape[1] % 32 == 0 and available()
            and int(codes.amin()) > -128)  # a reduction: no mask the size of a vocabulary's lm_head
