"""Tensor-parallel ranks as processes over gloo, for tests/models/test_tensor_parallel.py.

`python -m tests.support.tensor_parallel RANK WORLD STORE_FILE CHECKPOINTS OUT DEVICE` is one rank: it joins the others
through a FileStore, then takes its part in each of `RUNS` (a run: a model split into pipeline stages, each stage's
layers split over its ranks), runs `exercise` on its stage and writes what its last-stage rank computed to
OUT/{run}-rank{RANK}.safetensors, with the kv heads its cache holds and the vocabulary rows of its lm_head. A rank
fails if its load read a tensor twice, or (loading sharded) the embedding or lm_head whole. CHECKPOINTS holds one
safetensors checkpoint a config, in a folder of its name (`write_checkpoint`). DEVICE: where the weights go (cpu, or
cuda: every rank on the one GPU). Runs on disjoint ranks go on at once.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ringlet.models import safetensors_loader
from ringlet.models.llama import Transformer
from ringlet.models.paged_cache import FED, BatchLayout, SequenceStep
from ringlet.models.registry import build_stage, model_args
from ringlet.models.tensor_parallel import VocabParallelHead, load_sharded_stage, shard_stage
from ringlet.models.weights import LazyWeights
from tests.support.random_models import BASE, checkpoint_weights

CONFIGS: dict[str, dict[str, Any]] = {
    "llama": BASE,  # 3 query heads a key head, tied lm_head
    "qwen2": BASE | {"model_type": "qwen2", "tie_word_embeddings": False},  # q/k/v biases
    "qwen3": BASE | {"model_type": "qwen3"},  # per-head q/k norms
    # q/k/v and gate/up fused in the file; rotary on half of each head
    "phi3": BASE | {"model_type": "phi3", "tie_word_embeddings": False, "partial_rotary_factor": 0.5},
    # over 4 ranks: 2 query heads each, each key head held by the 2 ranks whose queries use it; 122 rows of
    # vocabulary in shares of 31 (the last padded)
    "wide": BASE | {"num_attention_heads": 8, "vocab_size": 122},
}


@dataclass(frozen=True)
class Run:
    name: str
    config: str
    stages: tuple[tuple[int, ...], ...]  # each pipeline stage's ranks (its tensor-parallel group), in layer order
    cut: bool = False  # load each stage whole, then cut it to the rank's share (`shard_stage`)
    paged: bool = False  # also run the paged CUDA decode step's kernels (`paged_steps`)


# phases: the runs of a phase use disjoint ranks and go on at once
PHASES: tuple[tuple[Run, ...], ...] = (
    (Run("llama-tp2", "llama", ((0, 1),), paged=True), Run("qwen2-tp2", "qwen2", ((2, 3),), paged=True)),
    (Run("qwen3-tp2", "qwen3", ((0, 1),)), Run("phi3-tp2", "phi3", ((2, 3),))),
    (Run("wide-tp4", "wide", ((0, 1, 2, 3),), paged=True),),
    (Run("llama-pp2-tp2", "llama", ((0, 1), (2, 3))),),
    (Run("llama-cut-tp2", "llama", ((0, 1),), cut=True), Run("qwen2-cut-tp2", "qwen2", ((2, 3),), cut=True)),
)
RUNS = {run.name: run for phase in PHASES for run in phase}
WORLD = 4
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton kernels can take CPU tensors (no GPU: conftest.py)


def write_checkpoint(name: str, path: Path) -> None:
    """CONFIGS[name] with `random_models`' weights as a safetensors checkpoint; phi3's q/k/v and gate/up fused, as
    Phi-3 checkpoints store them."""
    config = CONFIGS[name]
    args = model_args(config)
    weights = checkpoint_weights(args)
    if args.model_type == "phi3":
        for n in range(args.num_hidden_layers):
            p = f"model.layers.{n}."
            weights[p + "self_attn.qkv_proj.weight"] = torch.cat([weights.pop(p + f"self_attn.{x}_proj.weight")
                                                                  for x in "qkv"])
            weights[p + "mlp.gate_up_proj.weight"] = torch.cat([weights.pop(p + f"mlp.{x}_proj.weight")
                                                                for x in ("gate", "up")])
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config))


Step = Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], "torch.Tensor | None"]


@torch.inference_mode()
def exercise(model: Transformer, step: Step) -> dict[str, torch.Tensor]:
    """Every forward path on batch 2, in order, each through `step(forward, token ids)` (which feeds the stage the
    ids, or the previous stage's hidden states, and returns the last stage's output or None): a prompt, decode steps
    at int positions, a later prompt chunk, decode steps at tensor positions (the static-shape step), then batched
    steps over a paged cache (two prompts; a decode beside a chunk; two decodes)."""
    generator = torch.Generator().manual_seed(5)
    device = next(model.parameters()).device

    def ids(*shape: int) -> torch.Tensor:
        return torch.randint(model.args.vocab_size, shape, generator=generator).to(device)

    prompt, tokens, chunk = ids(2, 6), ids(2, 4), ids(2, 3)
    out: dict[str, torch.Tensor | None] = {}
    cache = model.make_cache(2, 32)

    def at(start: int | torch.Tensor, kv_len: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: model(x, cache, start, kv_len=kv_len)

    out["prefill"] = step(at(0), prompt)
    for i in range(2):
        out[f"decode{i}"] = step(at(6 + i), tokens[:, i:i + 1])
    out["chunk"] = step(at(8), chunk)
    for i in range(2):
        out[f"static{i}"] = step(at(torch.tensor([11 + i], device=device), kv_len=16), tokens[:, 2 + i:3 + i])
    model.prepare_positions(64)
    paged = model.make_paged_cache(num_blocks=8, block_size=4)

    def batched(layout: BatchLayout) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: model.forward_batch(x, paged, layout)

    a, b = [0, 1, 2], [3, 4, 5]
    batches = ([SequenceStep(0, 6, a), SequenceStep(0, 3, b)],
               [SequenceStep(6, 1, a), SequenceStep(3, 3, b)],
               [SequenceStep(7, 1, a), SequenceStep(6, 1, b)])
    for n, steps in enumerate(batches):
        layout = BatchLayout.build(steps, 4, device, paged.pad_slot)
        out[f"batch{n}"] = step(batched(layout), ids(layout.positions.shape[0]))
    return {name: tensor for name, tensor in out.items() if tensor is not None}


@torch.inference_mode()
def paged_steps(model: Transformer) -> dict[str, torch.Tensor]:
    """The logits of the paged CUDA decode step (`PagedDecodeStep`, its kernels run by Triton's interpreter on a CPU,
    as in tests/worker/engines/test_paged_decode.py) over a fresh cache: a step of two prompts' chunks, decode steps of
    two sequences (the second taking the first one's picks, FED) and of one (the GEMV kernels)."""
    from ringlet.worker.engines.torch.paged_decode import PagedDecodeStep

    cache = model.make_paged_cache(num_blocks=8, block_size=16)
    step = PagedDecodeStep(model, cache, context_length=64, max_batch=2, max_rows=16)
    a, b = [0, 1], [2, 3]
    return {name: logits.clone() for name, logits in (
        ("paged-chunks", step(torch.tensor([5, 17, 99, 3, 42, 8, 61, 2, 9]), [SequenceStep(0, 5, a),
                                                                              SequenceStep(0, 4, b)])),
        ("paged-decode2", step(torch.tensor([7, 3]), [SequenceStep(5, 1, a), SequenceStep(4, 1, b)])),
        ("paged-fed", step(torch.full((2,), FED), [SequenceStep(6, 1, a), SequenceStep(5, 1, b)])),
        ("paged-decode1", step(torch.tensor([11]), [SequenceStep(7, 1, a)])),
    )}


def single_process(model: Transformer, paged: bool = False) -> dict[str, torch.Tensor]:
    """`exercise` on a whole model in this process (and with `paged`, `paged_steps`)."""
    return exercise(model, lambda forward, ids: forward(ids)) | (paged_steps(model) if paged else {})


def pipeline_step(hidden_size: int, previous: int | None, following: int | None) -> Step:
    """A stage's `step`: hidden states come from rank `previous` and go to rank `following` (None: no such stage),
    through host memory as the ring's gloo frames go (gloo sends no CUDA tensors)."""

    def step(forward: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor) -> torch.Tensor | None:
        x = ids
        if previous is not None:
            x = torch.empty(*ids.shape, hidden_size)
            dist.recv(x, previous)
            x = x.to(ids.device)
        y = forward(x)
        if following is None:
            return y
        dist.send(y.contiguous().cpu(), following)
        return None

    return step


def take_part(run: Run, rank: int, groups: dict[tuple[int, ...], dist.ProcessGroup], checkpoints: Path,
              out: Path, device: str) -> None:
    index = next(i for i, ranks in enumerate(run.stages) if rank in ranks)
    ranks = run.stages[index]
    position = ranks.index(rank)
    path = checkpoints / run.config
    args = model_args(safetensors_loader.read_config(path))
    per_stage = args.num_hidden_layers // len(run.stages)
    start = index * per_stage
    end = args.num_hidden_layers if index == len(run.stages) - 1 else start + per_stage
    lazy = safetensors_loader.lazy_weights(path, start, end, args.num_hidden_layers, args.tie_word_embeddings)
    whole_reads: list[str] = []

    def recorded(name: str, read: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def record() -> torch.Tensor:
            whole_reads.append(name)
            return read()
        return record

    weights = LazyWeights({name: recorded(name, lazy._readers[name]) for name in lazy}, lazy._row_readers)
    if run.cut:
        model = shard_stage(cast(Transformer, build_stage(args, start, end, weights, device=device)), groups[ranks])
    else:
        model = load_sharded_stage(args, start, end, weights, groups[ranks], device=device)
        assert not {"model.embed_tokens.weight", "lm_head.weight"} & set(whole_reads), "an end was read whole"
    assert len(whole_reads) == len(set(whole_reads)), "a tensor was read twice"
    previous = run.stages[index - 1][position] if index > 0 else None
    following = run.stages[index + 1][position] if index + 1 < len(run.stages) else None
    results = exercise(model, pipeline_step(args.hidden_size, previous, following))
    # on a GPU the step captures graphs, and gloo's collectives cannot be captured; CPU tensors need Triton's interpreter
    if run.paged and device == "cpu" and INTERPRETED:
        results |= paged_steps(model)
    if following is None:  # with what its rank holds: the kv heads its cache has, the vocabulary rows its lm_head has
        assert isinstance(model.lm_head, VocabParallelHead)
        shares = {"kv_heads": torch.tensor(model.make_cache(1, 1).keys[0].shape[1]),
                  "head_rows": torch.tensor(model.lm_head.weight.shape[0])}
        save_file({name: tensor.cpu().contiguous() for name, tensor in (results | shares).items()},
                  out / f"{run.name}-rank{rank}.safetensors")


def main() -> None:
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    store_file, checkpoints, out, device = sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]), sys.argv[6]
    torch.set_num_threads(1)
    store = dist.FileStore(store_file, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
    for phase in PHASES:  # every rank makes every group, in the same order
        for run in phase:
            for ranks in run.stages:
                if ranks not in groups:
                    group = dist.new_group(list(ranks))
                    assert group is not None
                    groups[ranks] = group
    for phase in PHASES:
        for run in phase:
            if any(rank in ranks for ranks in run.stages):
                take_part(run, rank, groups, checkpoints, out, device)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
