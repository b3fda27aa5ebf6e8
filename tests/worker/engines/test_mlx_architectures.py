"""The MLX engine runs an architecture mlx-lm has and ringlet's torch models do not (a random Starcoder2, here on the
Linux CPU): its logits and greedy tokens are transformers', alone and batched, split into ring stages anywhere; its
card comes from the checkpoint and places it on MLX only; the torch engine refuses it, naming the MLX engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("mlx_lm", reason="the mlx engine needs mlx, mlx-cpu and mlx-lm (pip install them)")

from ringlet.master.placement import PlacementError, place
from ringlet.models.catalog import card_from_path
from ringlet.models.names import Catalog
from ringlet.shared.config import EngineConfig
from ringlet.shared.errors import ModelLoadError
from ringlet.shared.instances import InstanceType
from ringlet.shared.tasks import SamplingParams, TextGenerationTask
from ringlet.worker.engines.engine_init import initialize_engine, local_instance
from ringlet.worker.engines.mlx.stage import MlxStage
from ringlet.worker.engines.torch.generate import prompt_ids
from tests.support.mlx_only_models import reference_greedy, reference_model, starcoder2_checkpoint
from tests.support.node_infos import node_info

FP32 = EngineConfig(precision="fp32", kv_cache_tokens=16384)  # two 8k contexts, not a share of the memory
PROMPT_IDS = [1, 504, 3000, 77, 12000, 9, 41000, 23]
TOKENS = 10


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return starcoder2_checkpoint(tmp_path_factory.mktemp("starcoder2"))


@pytest.fixture(scope="module")
def untied_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return starcoder2_checkpoint(tmp_path_factory.mktemp("starcoder2-untied"), tied=False, seed=1)


def _reference_logits(path: Path, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference_model(path)(torch.tensor([ids])).logits[:, -1]


@pytest.mark.slow
def test_the_mlx_engine_gives_transformers_logits_and_greedy_tokens(untied_checkpoint: Path) -> None:
    checkpoint = untied_checkpoint  # a tied random model repeats its prompt's last token; this one does not
    engine = initialize_engine(local_instance(checkpoint, "mlx"), FP32)
    assert engine.name == "mlx" and engine.context_length == 512
    logits = engine._forward(torch.tensor([PROMPT_IDS]), 0)  # type: ignore[attr-defined]
    expected = _reference_logits(checkpoint, PROMPT_IDS)
    assert torch.allclose(logits, expected, atol=1e-4), (logits - expected).abs().max()

    task = TextGenerationTask(task_id="alone", prompt="def fibonacci(n):", max_tokens=TOKENS, ignore_eos=True,
                              sampling=SamplingParams(temperature=0))
    greedy = reference_greedy(checkpoint, prompt_ids(engine.tokenizer, task), TOKENS)  # type: ignore[attr-defined]
    assert len(set(greedy)) > TOKENS // 2
    alone = [c.token_id for c in engine.generate(task) if c.token_id is not None]
    assert alone == greedy

    batch = engine.batch_generator(4)  # type: ignore[attr-defined]  # a node's path: mlx-lm's batch generator
    batch.submit(task)
    batch.submit(task.model_copy(update={"task_id": "beside", "prompt": "Something else entirely"}))
    together: list[int] = []
    while batch:
        together += [c.token_id for c in batch.step() if c.task_id == "alone" and c.token_id is not None]
    assert together == greedy


def test_the_torch_engine_refuses_it_naming_the_mlx_engine(checkpoint: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"architecture 'starcoder2' is not supported; supported: .*llama.* \(by "
                                             r"ringlet's torch engines\); mlx-lm has a model for it.*--engine mlx"):
        initialize_engine(local_instance(checkpoint, "cpu"), FP32)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("split", [[(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)]], ids=["two", "three"])
def test_ring_stages_of_it_give_transformers_logits(checkpoint: Path, untied_checkpoint: Path, tied: bool,
                                                    split: list[tuple[int, int]]) -> None:
    path = checkpoint if tied else untied_checkpoint
    stages = [MlxStage.load(path, start, end, "fp32") for start, end in split]
    # a prompt in two chunks, then one decoded token: each stage's cache carries the positions
    steps = [(PROMPT_IDS[:5], 0), (PROMPT_IDS[5:], 5), ([321], len(PROMPT_IDS))]
    for ids, start in steps:
        x = torch.tensor([ids])
        for stage in stages:
            x = stage.forward(x, start)
        expected = _reference_logits(path, [*PROMPT_IDS, 321][:start + len(ids)])
        assert torch.allclose(x, expected, atol=1e-4), (start, (x - expected).abs().max())
    held = [{name for name, _ in _flat(stage.model.parameters()) if ".layers." not in name} for stage in stages]
    assert held[0] == {"model.embed_tokens.weight"}  # the first stage holds no head, no final norm
    assert all(not names for names in held[1:-1])  # a middle stage holds its layers alone
    assert held[-1] == ({"model.embed_tokens.weight"} if tied else {"lm_head.weight"}) | {"model.norm.weight",
                                                                                           "model.norm.bias"}


def _flat(parameters: dict[str, Any]) -> list[tuple[str, Any]]:
    from mlx.utils import tree_flatten

    flat = tree_flatten(parameters)
    assert isinstance(flat, list)
    return flat


def test_a_model_without_a_layer_list_is_refused_as_a_ring_stage() -> None:
    from mlx import nn

    from ringlet.worker.engines.mlx.engine import keep_layers

    class Opaque(nn.Module):  # a model whose layers are no list (as recurrent models keep theirs)
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Linear(4, 4)

    with pytest.raises(ModelLoadError, match="exposes no list of decoder layers .* cannot split it into stages"):
        keep_layers(Opaque(), 0, 1, None)


def test_its_card_comes_from_the_checkpoint_and_places_it_on_mlx_only(checkpoint: Path) -> None:
    card = card_from_path("sc2", checkpoint)
    reference = reference_model(checkpoint)
    assert card.instance_types == [InstanceType.MLX_RING, InstanceType.MLX_JACCL]
    assert (card.architecture, card.num_layers, card.hidden_size, card.vocab_size, card.context_length) == (
        "starcoder2", 4, 64, 49152, 512)
    assert card.num_parameters == reference.num_parameters()  # counted from the safetensors headers
    per_layer = sum(p.numel() for p in reference.model.layers[0].parameters())
    assert card.layer_parameters == per_layer
    assert card.stage_bytes(0, 4, "float32") == pytest.approx(4 * reference.num_parameters(), rel=0.01)

    # the node's catalog takes the directory as a model it can load
    assert Catalog(local_roots=[checkpoint]).add_local(str(checkpoint)).instance_types == card.instance_types

    mac = node_info("mac", 8, engines=("mlx",))
    pc = node_info("pc", 8, engines=("cpu",))
    placed = place(card, InstanceType.MLX_RING, [mac, pc], instance_id="i", min_nodes=1)
    assert [s.node_id for s in placed.instance.shards] == ["mac"]
    for refused in (InstanceType.CPU_RING, InstanceType.MIXED_RING):
        with pytest.raises(PlacementError, match=r"'starcoder2' is one of mlx-lm's that ringlet's torch engines do "
                                                 r"not build\); it runs as: MlxRing, MlxJaccl"):
            place(card, refused, [mac, pc], instance_id="i")
