"""The compiled CPU decode step (StaticDecoder without graphs): the tokens of eager decoding, and eager decoding
whenever compiling fails."""

from __future__ import annotations

import pytest
import torch

from ringlet.shared.config import EngineConfig
from ringlet.shared.tasks import ChatMessage, SamplingParams, TextGenerationTask
from ringlet.worker.engines.torch.engine import TorchEngine

QUESTION = TextGenerationTask(messages=[ChatMessage(role="user", content="What is the capital of France?")],
                              max_tokens=40, sampling=SamplingParams(temperature=0))


def answer(engine: TorchEngine) -> tuple[list[int], str]:
    chunks = list(engine.generate(QUESTION))
    return [c.token_id for c in chunks if c.token_id is not None], "".join(c.text for c in chunks)


@pytest.mark.slow
def test_compiled_cpu_decode_gives_the_eager_answer() -> None:
    # in fp32: the eager engine computes the last prompt token within the prompt, the compiled one alone, and an int4
    # kernel's sums differ with the rows it is given (PyTorch's on an AMX Xeon; ringlet's rounds x to int8), which
    # can flip a greedy token; `tests/models/test_cpu_vnni.py` compiles the int4/int8 ops themselves
    eager = TorchEngine.load(None, config=EngineConfig(precision="fp32", max_context=1024, cpu_compile=False))
    compiled = TorchEngine.load(None, config=EngineConfig(precision="fp32", max_context=1024, cpu_compile=True))
    assert compiled.decoder is not None and not compiled.decoder.ready  # nothing compiles before warm-up
    compiled.warmup()
    assert compiled.decoder.ready
    calls = 0
    step = compiled.decoder.step

    def counted(kv_len: int) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return step(kv_len)

    compiled.decoder.step = counted
    tokens, text = answer(compiled)
    # the last prompt token and every decode step ran compiled: one call per token sampled (the last may be EOS)
    assert calls in (len(tokens), len(tokens) + 1)
    assert text.strip()
    assert tokens == answer(eager)[0]


def test_a_failed_compile_leaves_eager_decoding(caplog: pytest.LogCaptureFixture) -> None:
    engine = TorchEngine.load(None, config=EngineConfig(max_context=256, cpu_compile=True))
    assert engine.decoder is not None

    def broken(kv_len: int) -> torch.Tensor:
        raise RuntimeError("no C++ compiler")

    engine.decoder.step = broken
    engine.warmup()
    assert not engine.decoder.ready
    assert "could not be compiled" in caplog.text
    eager = TorchEngine.load(None, config=EngineConfig(max_context=256, cpu_compile=False))
    assert answer(engine)[0] == answer(eager)[0]  # decoded eagerly, as an engine that never compiles
