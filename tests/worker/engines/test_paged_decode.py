"""The batched CUDA decode step over the paged KV cache, run by Triton's interpreter on CPU tensors (eagerly, from the
same buffers its CUDA graphs read), against the model's own packed forward. On a GPU, tests/worker/gpu runs it
compiled and graphed through the engine."""

from __future__ import annotations

import importlib

import pytest
import torch

from ringlet.models.paged_cache import FED, BatchLayout, SequenceStep
from ringlet.models.quant import Int4Embedding, Int8Embedding
from ringlet.models.quant_format import read_rows_int4, round_rows_int8
from tests.support.random_models import BASE, VARIANTS, random_model, sharpened

pytest.importorskip("triton", reason="Triton comes with CUDA builds of torch; scripts/test.sh installs it for these tests")

BLOCK = 16
# sequences of different lengths over scattered blocks of the cache: (prompt, block table)
SEQUENCES = [
    ([5, 17, 99, 3, 42, 8, 61, 2, 9, 33, 71, 14, 6, 88, 19, 27, 50, 4], [5, 1]),
    ([11, 2, 77], [2, 7, 0]),
    (list(range(30, 70)), [3, 6, 4, 8]),
]


@pytest.fixture(scope="module")
def paged_decode():
    module = importlib.import_module("ringlet.worker.engines.torch.paged_decode")
    fused = importlib.import_module("ringlet.worker.engines.torch.fused_decode")
    if not fused._INTERPRETED:
        pytest.skip("a GPU machine: tests/worker/gpu runs these kernels compiled")
    return module


def prefill(model, cache, sequences):  # type: ignore[no-untyped-def]
    for prompt, blocks in sequences:
        steps = [SequenceStep(0, len(prompt), blocks)]
        model.forward_batch(torch.tensor(prompt), cache, BatchLayout.build(steps, BLOCK, "cpu", cache.pad_slot))


def slots_of(blocks: list[int], length: int) -> list[int]:
    return [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(length)]


# the interpreter takes seconds a step: the batch of 3 of the llama variant in the quick run, the rest with the slow
@pytest.mark.parametrize("rows", [3, pytest.param(1, marks=pytest.mark.slow)],
                         ids=["a batch of 3 in a bucket of 4", "one sequence (GEMV kernels)"])
@pytest.mark.parametrize("variant", [v if v.startswith("llama") else pytest.param(v, marks=pytest.mark.slow)
                                     for v in VARIANTS])
def test_paged_step_gives_the_packed_forwards_logits_and_cache(paged_decode, variant, rows):
    model = random_model(BASE | VARIANTS[variant], torch.float32)
    sequences = SEQUENCES[:rows]
    eager, paged = model.make_paged_cache(10, BLOCK), model.make_paged_cache(10, BLOCK)
    step = paged_decode.PagedDecodeStep(model, paged, context_length=128, max_batch=4)
    lengths = [len(prompt) for prompt, _ in sequences]
    with torch.inference_mode():
        for cache in (eager, paged):
            prefill(model, cache, sequences)
        tokens = torch.tensor([7, 1, 118][:rows])
        for n in range(2):  # the second step takes the first one's picks on the device (FED)
            steps = [SequenceStep(length + n, 1, blocks) for length, (_, blocks) in zip(lengths, sequences)]
            want = model.forward_batch(tokens, eager, BatchLayout.build(steps, BLOCK, "cpu", eager.pad_slot))
            got = step(tokens if n == 0 else torch.full((rows,), FED), steps)
            assert got.shape == want.shape == (rows, 120)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
            assert step.last_picks.tokens() == got.argmax(-1).tolist()
            tokens = torch.tensor(step.last_picks.tokens())
    for layer in range(model.num_local_layers):  # new keys (rotated) and values where the packed forward wrote them
        for length, (_, blocks) in zip(lengths, sequences):
            written = torch.tensor(slots_of(blocks, length + 2))
            torch.testing.assert_close(paged.keys[layer][written], eager.keys[layer][written])
            torch.testing.assert_close(paged.values[layer][written], eager.values[layer][written])
        assert not paged.keys[layer][paged.pad_slot].any()  # padding rows wrote the scratch slot, not the zeros


@pytest.mark.parametrize("tile", [16, 32], ids=["ten splits, two steps of the join", "five splits, one step"])
def test_a_long_sequence_attends_over_its_splits(paged_decode, monkeypatch, tile):
    """150 cached positions in splits of one tile each, which the last split to finish joins (JOIN_SPLITS of them a
    step of its loop)."""
    monkeypatch.setattr(paged_decode, "POSITIONS_PER_TILE", tile)
    model = sharpened(random_model(BASE, torch.float32))
    eager, paged = model.make_paged_cache(12, BLOCK), model.make_paged_cache(12, BLOCK)
    step = paged_decode.PagedDecodeStep(model, paged, context_length=192, max_batch=1)
    blocks = [11, 3, 7, 0, 9, 1, 5, 2, 8, 4]
    prompt = [(7 * i + 3) % 120 for i in range(150)]
    assert step._splits(1) * tile > len(prompt) > paged_decode.JOIN_SPLITS * 16
    with torch.inference_mode():
        for cache in (eager, paged):
            prefill(model, cache, [(prompt, blocks)])
        steps = [SequenceStep(len(prompt), 1, blocks)]
        want = model.forward_batch(torch.tensor([42]), eager, BatchLayout.build(steps, BLOCK, "cpu", eager.pad_slot))
        got = step(torch.tensor([42]), steps)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_buckets_cover_the_largest_batch(paged_decode):
    assert paged_decode.batch_buckets(1) == [1]
    assert paged_decode.batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert paged_decode.batch_buckets(48) == [1, 2, 4, 8, 16, 32, 64]
    assert paged_decode.batch_buckets(300, 16) == [16, 32, 64, 128, 256, 512]


@pytest.mark.parametrize("variant", [v for v in VARIANTS if not v.startswith("qwen2")])  # qwen3: keys normalised
def test_a_step_with_prompt_chunks_gives_the_packed_forwards_logits_and_cache(paged_decode, variant):
    """One decode, the rest of a prompt and the first chunk of another (no logits) in one graphed step; then a decode
    step that follows on from its picks."""
    model = random_model(BASE | VARIANTS[variant], torch.float32)
    eager, paged = model.make_paged_cache(10, BLOCK), model.make_paged_cache(10, BLOCK)
    step = paged_decode.PagedDecodeStep(model, paged, context_length=128, max_batch=4, max_rows=16)
    (first, first_blocks), (second, second_blocks), (third, third_blocks) = SEQUENCES
    with torch.inference_mode():
        for cache in (eager, paged):  # the first prompt whole, the second's first token
            prefill(model, cache, [(first, first_blocks), (second[:1], second_blocks)])
        steps = [SequenceStep(len(first), 1, first_blocks), SequenceStep(1, 2, second_blocks),
                 SequenceStep(0, 12, third_blocks, wants_logits=False)]
        tokens = torch.tensor([7, *second[1:], *third[:12]])
        assert step.takes(steps) and not step.takes([SequenceStep(0, 17, third_blocks)])
        want = model.forward_batch(tokens, eager, BatchLayout.build(steps, BLOCK, "cpu", eager.pad_slot))
        got = step(tokens, steps)
        assert got.shape == want.shape == (2, 120)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        assert step.last_picks.tokens() == got.argmax(-1).tolist()
        # the two sequences that sampled decode on, from the picks on the device
        steps = [SequenceStep(len(first) + 1, 1, first_blocks), SequenceStep(3, 1, second_blocks)]
        picked = torch.tensor(step.last_picks.tokens())
        want = model.forward_batch(picked, eager, BatchLayout.build(steps, BLOCK, "cpu", eager.pad_slot))
        got = step(torch.full((2,), FED), steps)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    for layer in range(model.num_local_layers):
        for length, blocks in ((len(first) + 2, first_blocks), (4, second_blocks), (12, third_blocks)):
            written = torch.tensor(slots_of(blocks, length))
            torch.testing.assert_close(paged.keys[layer][written], eager.keys[layer][written])
            torch.testing.assert_close(paged.values[layer][written], eager.values[layer][written])
        assert not paged.keys[layer][paged.pad_slot].any()


@pytest.mark.parametrize("bits", [8, 4])
def test_paged_step_reads_a_quantised_embedding_as_the_packed_forward_does(paged_decode, bits):
    """A quantised stage's embedding is int8 rows with a step each, or 4-bit groups (a CUDA int4 stage's): the
    looked-up rows are scaled back."""
    model = random_model(BASE, torch.float32)
    table = model.embed_tokens.weight.detach()
    model.embed_tokens = (Int8Embedding(round_rows_int8(table), torch.float32) if bits == 8 else
                          Int4Embedding(read_rows_int4(table.shape[0], lambda a, b: table[a:b], table.shape[1], "cpu"),
                                        torch.float32))
    sequences = SEQUENCES[:2]
    eager, paged = model.make_paged_cache(10, BLOCK), model.make_paged_cache(10, BLOCK)
    step = paged_decode.PagedDecodeStep(model, paged, context_length=128, max_batch=4)
    with torch.inference_mode():
        for cache in (eager, paged):
            prefill(model, cache, sequences)
        tokens = torch.tensor([7, 118])
        steps = [SequenceStep(len(prompt), 1, blocks) for prompt, blocks in sequences]
        want = model.forward_batch(tokens, eager, BatchLayout.build(steps, BLOCK, "cpu", eager.pad_slot))
        got = step(tokens, steps)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


MOE = {"num_experts": 6, "num_experts_per_tok": 3, "moe_intermediate_size": 48, "num_hidden_layers": 3}


@pytest.mark.parametrize("config", [
    BASE | MOE | {"model_type": "qwen3_moe", "num_key_value_heads": 3, "norm_topk_prob": True, "mlp_only_layers": [1]},
    BASE | MOE | {"model_type": "qwen3_moe", "num_key_value_heads": 3, "norm_topk_prob": False},
    BASE | MOE | {"model_type": "mixtral", "intermediate_size": 48},
], ids=["qwen3_moe, a dense layer between sparse ones", "qwen3_moe, weights not renormalised", "mixtral"])
def test_paged_step_routes_experts_as_the_packed_forward_does(paged_decode, config):
    """Sparse layers in the graphed step: routing, each pair's gated product and the weighted sum of the chosen
    experts' outputs on the device, for two sequences and then the step that follows on from their picks."""
    model = random_model(config, torch.float32)
    for moe in (block.mlp for block in model.layers if hasattr(block.mlp, "router")):
        moe.router.data *= 50  # routers that choose: experts' weights differ
    sequences = SEQUENCES[:2]
    eager, paged = model.make_paged_cache(10, BLOCK), model.make_paged_cache(10, BLOCK)
    step = paged_decode.PagedDecodeStep(model, paged, context_length=128, max_batch=2)
    with torch.inference_mode():
        for cache in (eager, paged):
            prefill(model, cache, sequences)
        tokens = torch.tensor([7, 118])
        for n in range(2):
            steps = [SequenceStep(len(prompt) + n, 1, blocks) for prompt, blocks in sequences]
            want = model.forward_batch(tokens, eager, BatchLayout.build(steps, BLOCK, "cpu", eager.pad_slot))
            got = step(tokens if n == 0 else torch.full((2,), FED), steps)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
            tokens = torch.tensor(step.last_picks.tokens())


def test_route_kernel_chooses_as_the_sparse_layer_does(paged_decode):
    """The top k of the softmax over the router's logits, ties to the lower index, weights renormalised or not: as
    `SparseMoE.route` chooses (two one-hot tokens, so that the router's columns are the logits)."""
    from ringlet.models.config import ModelArgs
    from ringlet.models.moe import SparseMoE
    from ringlet.worker.engines.torch.expert_kernels import _route

    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0, 0.1], [3.0, -2.0, 0.0, 1.0, 1.0]])
    for renorm in (True, False):
        args = ModelArgs("qwen3_moe", 2, 8, 1, 1, 1, 16, head_dim=2, num_experts=5, num_experts_per_tok=3,
                         moe_intermediate_size=4, norm_topk_prob=renorm)
        moe = SparseMoE(args)
        moe.router.data = logits.t().contiguous()
        want_ids, want_weights = moe.route(torch.eye(2))
        ids, weights = torch.zeros(6, dtype=torch.int32), torch.zeros(6)
        _route[(2,)](logits, ids, weights, 5, TOP_K=3, E_PAD=8, RENORM=renorm)
        assert ids.view(2, 3).tolist() == [[1, 2, 0], [0, 3, 4]] == want_ids.tolist()
        torch.testing.assert_close(weights.view(2, 3), want_weights)


def int4_model():  # type: ignore[no-untyped-def]
    """The small random model with its projections in int4 groups of 32 and its head in int8, as a CUDA int4 load
    keeps them (here on CPU tensors)."""
    from ringlet.models.quant_cuda import CudaInt4Linear, CudaInt8Linear
    from ringlet.models.quant_format import GroupQuantized

    model = random_model(BASE, torch.bfloat16)
    for block in model.layers:
        for owner, name in ((block.self_attn, "qkv_proj"), (block.self_attn, "o_proj"), (block.mlp, "gate_up_proj"),
                            (block.mlp, "down_proj")):
            weight = getattr(owner, name).weight.detach().float()
            setattr(owner, name, CudaInt4Linear(GroupQuantized.round(weight, 32), None, torch.bfloat16))
    model.lm_head = CudaInt8Linear(model.embed_tokens.weight.detach().float(), None, torch.bfloat16)
    return model


def test_the_int4_projections_to_tune_are_one_a_shape_with_every_layer_and_what_the_step_fuses(
        paged_decode, monkeypatch, caplog):
    from ringlet.models.kernels import gemv_tuning
    from ringlet.worker.engines.torch import fused_decode

    model = int4_model()
    found = {(p.n, p.k, p.group, p.gated, p.norm, p.residual): p.layers
             for p in fused_decode.one_row_projections(model)}
    q_dim, kv_dim = BASE["num_attention_heads"] * BASE["head_dim"], BASE["num_key_value_heads"] * BASE["head_dim"]
    hidden, inter = BASE["hidden_size"], BASE["intermediate_size"]
    assert set(found) == {(q_dim + 2 * kv_dim, hidden, 32, False, True, False), (hidden, q_dim, 32, False, False, True),
                          (inter, hidden, 32, True, True, False), (hidden, inter, 32, False, False, True)}
    assert found[hidden, q_dim, 32, False, False, True] == tuple(b.self_attn.o_proj for b in model.layers)
    # a tensor-parallel rank adds its o and down products into a buffer of their own
    assert not any(p.residual for p in fused_decode.one_row_projections(model, residual=False))

    step = paged_decode.PagedDecodeStep(model, model.make_paged_cache(10, BLOCK), context_length=128, max_batch=4)
    tuned = []
    monkeypatch.setattr(gemv_tuning, "worth_timing", lambda p, device: True)
    monkeypatch.setattr(gemv_tuning, "tune", lambda projections, device: tuned.append(len(projections)))
    step.tune()
    assert not tuned  # no CUDA graphs (Triton's interpreter): nothing to time
    step.graphed = True
    step.tune()
    assert tuned == [4]

    def fails(projections, device):  # type: ignore[no-untyped-def]
        raise RuntimeError("out of memory\nthe rest")

    monkeypatch.setattr(gemv_tuning, "tune", fails)
    step.tune()
    assert "keeping the default int4 tilings: timing them failed: RuntimeError: out of memory" in caplog.text
    assert "the rest" not in caplog.text


class Unbuildable:
    """A graphed step whose kernels fail to build at warm-up, as on a GPU that Triton cannot compile for."""

    def warm(self) -> None:
        raise RuntimeError("PTX assembly failed\nthe rest of a long compiler message")


def test_a_graphed_step_that_cannot_be_built_leaves_eager_decoding(caplog):
    from ringlet.models.loader import LoadedStage
    from ringlet.models.random_checkpoint import synthetic_tokenizer
    from ringlet.shared.config import EngineConfig
    from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine

    model = random_model(BASE, torch.float32)
    stage = LoadedStage(model.args, model, synthetic_tokenizer(model.args.vocab_size), 0, model.args.num_hidden_layers)
    engine = TorchBatchEngine(stage, torch.device("cpu"), EngineConfig(kv_cache_tokens=1024, cpu_compile=False))
    engine.paged_decode = Unbuildable()
    engine.warmup()  # its short generation runs on the eager step
    assert engine.paged_decode is None
    assert "decoding eagerly: RuntimeError: PTX assembly failed" in caplog.text
    assert "the rest" not in caplog.text


@pytest.mark.parametrize("n", [7, 2048, 5000], ids=["shorter than a part", "one whole part", "parts and a tail"])
def test_greedy_picks_match_torch_argmax_with_ties_nan_and_infinities(paged_decode, n):
    torch.manual_seed(n)
    logits = torch.randn(6, n).to(torch.bfloat16)
    logits[1, n // 2] = logits[1, n - 1] = 50.0  # a tie: the first index wins
    logits[2] = float("-inf")  # nothing but -inf: index 0
    logits[3, n - 1] = float("inf")
    logits[4, n // 3] = float("nan")  # NaN is the largest, as torch has it
    logits[5] = 1.0  # every element equal
    wide = torch.zeros(6, n + 3, dtype=torch.bfloat16)
    wide[:, :n] = logits  # rows a stride apart that is not their length
    picked = torch.full((6,), -1, dtype=torch.long)
    paged_decode.greedy_picks(wide[:, :n], picked, paged_decode.argmax_parts(6, n, torch.device("cpu")))
    assert picked.tolist() == torch.argmax(logits, dim=-1).tolist()
    assert picked[1] == n // 2 and picked[4] == n // 3
