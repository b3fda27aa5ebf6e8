"""Which torch.distributed backend a ring of Intel GPU stages uses: xccl where it works between every stage, tried
at ring start, else gloo with host tensors.

xccl being present says nothing of whether it runs (oneCCL's own transport, the Level Zero driver, IPC between the
GPUs); a ring that picked it and cannot use it hangs at its first send. So each stage starts an xccl group of its
own on the ring's store and all-reduces one number on its GPU within `PROBE_TIMEOUT_S`; each says on the store
how that went, and the ring uses xccl only where every stage's worked.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist

from ringlet.shared.errors import first_line

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 20.0  # the probe group's rendezvous and its all-reduce; a ring's stages start within it
PROBE_PREFIX = "xccl-probe"




def xccl_problem(store: dist.Store, rank: int, size: int, device: torch.device,
                 timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why this stage cannot use xccl (None: it can): not in this PyTorch, or a group of it failed here."""
    if not getattr(dist, "is_xccl_available", lambda: False)():
        return "this PyTorch has no xccl backend"
    try:
        dist.init_process_group("xccl", store=dist.PrefixStore(PROBE_PREFIX, store), rank=rank, world_size=size,
                                timeout=timedelta(seconds=timeout_s))
    # RuntimeError from oneCCL or the driver, DistBackendError / DistStoreError (RuntimeErrors) from the rendezvous,
    # ValueError for a backend this build names but cannot make
    except (RuntimeError, ValueError) as error:
        return f"xccl failed to start ({first_line(error)})"
    try:
        one = torch.ones(1, device=device)
        dist.all_reduce(one)
        if int(one.item()) != size:
            return f"xccl's all-reduce of {size} ones gave {one.item()}"
    except RuntimeError as error:
        return f"xccl's first all-reduce failed ({first_line(error)})"
    finally:
        dist.destroy_process_group()
    return None


def ring_backend(store: dist.Store, rank: int, size: int, device: torch.device, what: str,
                 timeout_s: float = PROBE_TIMEOUT_S) -> str:
    """"xccl" where it worked on every stage of the ring, else "gloo" (host tensors), with one log line saying
    why. Every stage calls it at ring start, with the ring's store, and all get the same answer."""
    problem = xccl_problem(store, rank, size, device, timeout_s)
    store.set(f"{PROBE_PREFIX}/{rank}", problem or "")
    problems = [(r, store.get(f"{PROBE_PREFIX}/{r}").decode()) for r in range(size)]
    failed = [(r, reason) for r, reason in problems if reason]
    if not failed:
        log.info("%s: the ring's stages talk over xccl", what)
        return "xccl"
    r, reason = failed[0]
    log.warning("%s: xccl is not usable on this ring (stage %d: %s); using gloo with host tensors", what, r, reason)
    return "gloo"
