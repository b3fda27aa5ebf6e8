"""What was downloaded loads and generates: the weights are the served ones, a stage loads from a partial copy."""

from __future__ import annotations

import pytest
import torch

from ringlet.models.download import download_model
from ringlet.models.embedded import embedded_model_path
from ringlet.models.loader import load_stage
from ringlet.models.store import find_local
from ringlet.shared.errors import ModelLoadError
from ringlet.shared.tasks import ChatMessage, SamplingParams, TextGenerationTask
from ringlet.worker.engines.torch.engine import TorchEngine
from tests.support.fake_hub import FakeHub, HubRepo
from tests.support.hub import NUM_LAYERS, REPO_ID


def test_downloaded_model_matches_transformers_and_generates(hub: FakeHub) -> None:
    import transformers

    path = download_model(REPO_ID)
    ids = torch.tensor([[1, 6, 7, 8, 9]])
    reference = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    stage = load_stage(path)
    with torch.inference_mode():
        expected = reference(ids).logits[:, -1]
        got = stage.model(ids, stage.model.make_cache(1, 32), 0, last_logits_only=True)[:, -1]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    engine = TorchEngine.load(path)
    task = TextGenerationTask(messages=[ChatMessage(role="user", content="hello world")], max_tokens=4,
                              sampling=SamplingParams(temperature=0), ignore_eos=True)
    chunks = list(engine.generate(task))
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


def test_a_stage_loads_from_a_partial_download(hub: FakeHub) -> None:
    path = download_model(REPO_ID, layers=(0, 2))
    assert find_local(REPO_ID) == path
    stage = load_stage(path, 0, 2)
    assert (stage.start, stage.end) == (0, 2)
    with pytest.raises(ModelLoadError, match="missing; re-download"):
        load_stage(path, 2, NUM_LAYERS)


def test_gguf_repo_downloads_and_opens(hub: FakeHub) -> None:
    """The embedded SmolLM2 GGUF served as a hub repo, pulled by quantisation name.

    The bytes are the embedded model's, which the GGUF loader's own tests run (parsing its metadata
    alone takes ~5 s here, so it is not repeated).
    """
    gguf = embedded_model_path()
    hub.repos["HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"] = HubRepo({gguf.name: gguf.read_bytes()})
    path = download_model("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_1")
    assert path.name == gguf.name and path.read_bytes() == gguf.read_bytes()
    assert find_local("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF") == path
