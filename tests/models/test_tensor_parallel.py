"""Tensor parallelism (ringlet/models/tensor_parallel.py) against the whole model in one process: 4 CPU processes over
gloo (on loopback, met through a file) load tiny random checkpoints split over 2 or 4 ranks, alone or as 2 pipeline
stages of 2 ranks each, or load a stage whole and cut it, and their fp32 logits of every forward path must match
(tests/support/tensor_parallel.py), the paged CUDA decode step's kernels among them where Triton interprets (no GPU:
tests/conftest.py); each rank's cache holds its share of the kv heads, its lm_head its share of the vocabulary, and a
sharded load reads no tensor twice and neither end whole."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ringlet.models.registry import model_args
from ringlet.models.tensor_parallel import check_shardable, vocab_share
from ringlet.shared.errors import ModelLoadError
from tests.support.random_models import BASE, load_checkpoint_stage
from tests.support.tensor_parallel import CONFIGS, INTERPRETED, RUNS, WORLD, single_process, write_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300


def start_ranks(base: Path, device: str) -> tuple[Path, Path]:
    """(checkpoints, outputs) once every rank, its weights on `device`, has taken its part in every run."""
    checkpoints, out = base / "checkpoints", base / "out"
    out.mkdir()
    for name in CONFIGS:
        write_checkpoint(name, checkpoints / name)
    env = os.environ | {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    logs = [base / f"rank{rank}.log" for rank in range(WORLD)]
    processes = []
    for rank in range(WORLD):
        with logs[rank].open("w") as log:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "tests.support.tensor_parallel", str(rank), str(WORLD),
                 str(base / "store"), str(checkpoints), str(out), device],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.0, deadline - time.monotonic()))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    codes = [process.returncode for process in processes]  # -9: killed after TIMEOUT_S
    failed = [f"rank {rank} exited with {code}:\n{logs[rank].read_text()[-4000:]}"
              for rank, code in enumerate(codes) if code != 0]
    assert not failed, "\n".join(failed)
    return checkpoints, out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return start_ranks(tmp_path_factory.mktemp("tensor-parallel"), "cpu")


def compare(run: str, checkpoints: Path, out: Path, device: str = "cpu", tolerance: float = 1e-4) -> None:
    spec = RUNS[run]
    expected = single_process(load_checkpoint_stage(checkpoints / spec.config).to(device),
                              paged=spec.paged and device == "cpu" and INTERPRETED)
    for rank in spec.stages[-1]:  # every rank of the last stage has the whole logits
        got = load_file(out / f"{run}-rank{rank}.safetensors")
        args, size = model_args(CONFIGS[spec.config]), len(spec.stages[-1])
        assert got.pop("kv_heads").item() == max(1, args.num_key_value_heads // size)
        assert got.pop("head_rows").item() == -(-args.vocab_size // size)
        assert sorted(got) == sorted(expected)
        for name, logits in expected.items():
            assert logits.shape[-1] == args.vocab_size
            try:
                torch.testing.assert_close(got[name], logits.cpu(), rtol=tolerance, atol=tolerance)
            except AssertionError as e:
                raise AssertionError(f"{run}, rank {rank}, {name}: {e}") from None


@pytest.mark.parametrize("run", ["llama-tp2", "qwen2-tp2", "qwen3-tp2", "phi3-tp2"])
def test_two_ranks_match_one_process(ranks: tuple[Path, Path], run: str) -> None:
    compare(run, *ranks)


def test_four_ranks_repeat_kv_heads_and_pad_the_vocabulary(ranks: tuple[Path, Path]) -> None:
    compare("wide-tp4", *ranks)


def test_pipeline_stages_of_two_ranks_each(ranks: tuple[Path, Path]) -> None:
    compare("llama-pp2-tp2", *ranks)


@pytest.mark.parametrize("run", ["llama-cut-tp2", "qwen2-cut-tp2"])
def test_a_stage_loaded_whole_cut_to_its_share(ranks: tuple[Path, Path], run: str) -> None:
    compare(run, *ranks)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_ranks_on_one_gpu_match_one_process(tmp_path: Path) -> None:
    """The CUDA paths (the static decode step's own attention kernel among them), the 4 ranks sharing one GPU: gloo
    carries the collectives, as NCCL takes one rank a GPU."""
    checkpoints, out = start_ranks(tmp_path, "cuda")
    for run in RUNS:
        compare(run, checkpoints, out, "cuda", tolerance=1e-3)


def test_vocabulary_shares_cover_it_once() -> None:
    for vocab, ranks in ((120, 2), (122, 4), (7, 4), (5, 8)):
        shares = [vocab_share(vocab, rank, ranks) for rank in range(ranks)]
        rows = [row for first, count in shares for row in range(first, first + count)]
        assert rows == list(range(vocab))
        assert max(count for _, count in shares) == -(-vocab // ranks)


@pytest.mark.parametrize(("change", "ranks", "message"), [
    ({}, 4, "6 attention heads do not split over 4"),
    ({"model_type": "qwen3", "num_key_value_heads": 3}, 2, "3 key/value heads"),
    ({"intermediate_size": 161}, 2, "MLP of 161 columns"),
    ({"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}, 2, "pipeline stages instead"),
])
def test_what_cannot_be_split_is_refused(change: dict, ranks: int, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        check_shardable(model_args(BASE | change), ranks)


def test_kv_heads_repeat_only_evenly() -> None:
    check_shardable(model_args(BASE | {"num_attention_heads": 8}), 4)  # 2 kv heads, each on 2 of the 4 ranks
    check_shardable(model_args(BASE | {"num_attention_heads": 12, "intermediate_size": 168}), 6)  # each on 3
    with pytest.raises(ModelLoadError, match="4 key/value heads"):
        check_shardable(model_args(BASE | {"num_attention_heads": 12, "num_key_value_heads": 4,
                                           "intermediate_size": 168}), 6)
