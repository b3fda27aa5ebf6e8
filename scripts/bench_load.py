"""Loads one model as the CPU engine does, in this process, and prints how long it took and the memory it held.

    python scripts/bench_load.py /tmp/llama-8b-q4_k_m.gguf [--precision auto]

Printed as one JSON line: seconds, resident memory before the load (the interpreter and torch), the peak (the
kernel's high-water mark, VmHWM, as tests/models/test_load_memory.py reads it), what the stage's tensors take, and
the resident memory after. Run it twice with the same RINGLET_HOME to see a GGUF file's second load, from the repack
cache the first one wrote; with RINGLET_GGUF_CACHE=0 for a load that neither reads nor writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import ringlet.models.gguf_loader
import ringlet.models.llama  # noqa: F401  (imported before the baseline: code is not weights)
from ringlet.models.loader import reporting_load_progress
from ringlet.worker.engines.torch.engine import load_torch_stage

GB = 1e9


def resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def high_water_mark() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a GGUF file, a model directory, or a model's name")
    parser.add_argument("--precision", default="auto", help="as `ringlet run --precision` (default: auto)")
    parser.add_argument("--layers", action="store_true", help="also print the memory after every fourth layer")
    args = parser.parse_args()

    before, start = resident(), time.perf_counter()

    def report(done: int, total: int, kept: int) -> None:
        if args.layers and (done % 4 == 0 or done == total):
            print(json.dumps({"layers": f"{done}/{total}", "seconds": round(time.perf_counter() - start, 1),
                              "resident_gb": round(resident() / GB, 3), "peak_gb": round(high_water_mark() / GB, 3),
                              "kept_gb": round(kept / GB, 3)}), flush=True)

    with reporting_load_progress(report):
        stage, precision = load_torch_stage(args.model, precision=args.precision)
    seconds = time.perf_counter() - start
    held = sum(t.numel() * t.element_size() for t in [*stage.model.parameters(), *stage.model.buffers()])
    print(json.dumps({"model": args.model, "precision": precision, "seconds": round(seconds, 1),
                      "before_gb": round(before / GB, 3), "peak_gb": round(high_water_mark() / GB, 3),
                      "held_gb": round(held / GB, 3), "after_gb": round(resident() / GB, 3)}))


if __name__ == "__main__":
    main()
