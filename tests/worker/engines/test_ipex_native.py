"""The ipex engine without IPEX, on native torch.xpu: here a fake Intel GPU whose tensors live on the CPU.

Everything above the torch.xpu surface is real: the shared model, the generation loop, the memory check,
the guard that retries device errors and falls back to the CPU engine.
"""

from __future__ import annotations

import json
import logging

import jsonschema_rs
import pytest
import torch

from ringlet.models.loader import read_model_config
from ringlet.models.tools import named_call_constraint, template_inputs
from ringlet.shared.config import EngineConfig
from ringlet.shared.instances import BoundInstance, Instance, Shard
from ringlet.shared.tasks import ChatMessage, FunctionSpec, SamplingParams, TextGenerationTask
from ringlet.worker.engines.engine_init import initialize_engine
from ringlet.worker.engines.engine_utils import ipex_status
from ringlet.worker.engines.ipex import IPEXDriverError, IPEXMemoryError, IPEXTokenizerWrapper
from ringlet.worker.engines.ipex.device import XpuDevice, open_xpu
from ringlet.worker.engines.ipex.engine import IpexEngine
from ringlet.worker.engines.ipex.utils_ipex import estimate_bytes, load_ipex_engine
from tests.support.greedy import assert_parting_is_a_near_tie, compare_with_reference, greedy_task, run_greedy
from tests.support.xpu import INTEL_ARC_ON_BUS, FakeXpu, GiB, fake_runtime, probes

SETTINGS = EngineConfig(precision="fp32", kv_cache_tokens=4096)  # the fake GPU's memory is the host's
FALLBACK_LOGGER = "ringlet.worker.engines.ipex.generator.generate"
DEVICE_LOST = "Native API failed. Native API returns: -36 (UR_RESULT_ERROR_DEVICE_LOST)"


@pytest.fixture(scope="module")
def fake_gpu() -> FakeXpu:
    return FakeXpu(total=16 * GiB)


@pytest.fixture(scope="module")
def xpu_engine(fake_gpu: FakeXpu) -> IpexEngine:
    assert not ipex_status().usable  # this environment has no IPEX: the native torch.xpu path
    return load_ipex_engine(None, device=XpuDevice(fake_runtime(fake_gpu)), config=SETTINGS, optimization="eager")


@pytest.mark.slow
def test_loads_and_generates_through_native_xpu_like_the_cpu_engine(xpu_engine, cpu_reference) -> None:  # type: ignore[no-untyped-def]
    assert xpu_engine.name == "ipex" and xpu_engine.loaded.ipex_version is None
    assert xpu_engine.optimization == "eager (native torch.xpu, no IPEX, not compiled)"
    run = run_greedy(xpu_engine, greedy_task())
    assert run == cpu_reference  # same fp32 kernels underneath: identical greedy tokens
    assert len(run.generated) == 32 and run.text


@pytest.mark.slow
def test_transient_device_errors_are_retried(xpu_engine, fake_gpu, cpu_reference, caplog) -> None:  # type: ignore[no-untyped-def]
    fake_gpu.fail(RuntimeError(DEVICE_LOST), RuntimeError(DEVICE_LOST), after=5)
    with caplog.at_level(logging.WARNING):
        assert run_greedy(xpu_engine, greedy_task()) == cpu_reference
    assert not fake_gpu.failures and xpu_engine.fallback_reason is None and xpu_engine.name == "ipex"
    assert not [r for r in caplog.records if r.name == FALLBACK_LOGGER]


@pytest.mark.slow
def test_out_of_memory_while_generating_frees_the_cache_and_says_what_to_do(xpu_engine, fake_gpu) -> None:  # type: ignore[no-untyped-def]
    cleared = fake_gpu.empty_cache_calls
    fake_gpu.fail(torch.OutOfMemoryError("XPU out of memory. Tried to allocate 2.00 GiB"), after=3)
    with pytest.raises(IPEXMemoryError) as caught:
        run_greedy(xpu_engine, greedy_task())
    message = str(caught.value)
    assert "out of memory on xpu:0" in message and "Tried to allocate 2.00 GiB" in message
    assert "16.00 GiB is free now" in message and "shorten the prompt" in message
    assert caught.value.free_bytes == 16 * GiB
    assert fake_gpu.empty_cache_calls == cleared + 1


@pytest.mark.slow
def test_a_bug_is_not_mistaken_for_a_device_error(xpu_engine, fake_gpu) -> None:  # type: ignore[no-untyped-def]
    fake_gpu.fail(RuntimeError("mat1 and mat2 shapes cannot be multiplied (1x576 and 577x576)"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        run_greedy(xpu_engine, greedy_task())
    assert xpu_engine.fallback_reason is None


@pytest.mark.slow
def test_repeated_device_errors_fall_back_to_the_cpu_engine_mid_stream(cpu_reference, caplog) -> None:  # type: ignore[no-untyped-def]
    gpu = FakeXpu()
    engine = load_ipex_engine(None, device=XpuDevice(fake_runtime(gpu)), config=SETTINGS, optimization="eager",
                              max_retries=2)
    gpu.fail(*(RuntimeError(DEVICE_LOST) for _ in range(3)), after=10)  # the 10th decode step keeps failing
    with caplog.at_level(logging.WARNING):
        run = run_greedy(engine, greedy_task())
    # the CPU engine replayed the device's cached tokens and the stream went on where it was
    assert run == cpu_reference
    lines = [r.getMessage() for r in caplog.records if r.name == FALLBACK_LOGGER]
    assert len(lines) == 1
    assert "failed 3 times in a row" in lines[0] and "UR_RESULT_ERROR_DEVICE_LOST" in lines[0]
    assert "now runs on the CPU engine" in lines[0]
    assert engine.name == "cpu" and engine.fallback_reason and engine.model is None
    assert engine.fallback_reason.startswith("xpu:0 (Intel(R) Arc(TM) A770 Graphics) failed 3 times in a row")
    assert engine.optimization == "none (the cpu engine, after the device failed)"
    later = run_greedy(engine, greedy_task(tokens=3))  # later requests run on the CPU too
    assert later.generated == cpu_reference.generated[:3]
    assert len([r for r in caplog.records if r.name == FALLBACK_LOGGER]) == 1


def test_model_that_does_not_fit_is_refused_before_loading() -> None:
    gpu = FakeXpu(total=8 * GiB, free=100 * 2**20)
    with pytest.raises(IPEXMemoryError) as caught:
        load_ipex_engine(None, device=XpuDevice(fake_runtime(gpu)), config=EngineConfig(precision="bf16"))
    error = caught.value
    assert error.free_bytes == 100 * 2**20 and error.needed_bytes and error.needed_bytes > error.free_bytes
    assert "needs about" in str(error) and "only 0.10 GiB is free" in str(error)
    assert "xpu:0 (Intel(R) Arc(TM) A770 Graphics)" in str(error)


def test_memory_estimate_counts_weights_and_kv_cache() -> None:
    _, args = read_model_config(None)
    weights_bf16 = args.num_parameters * 2
    kv_8k = args.num_hidden_layers * 2 * args.num_key_value_heads * args.head_dim * 8192 * 2
    estimate = estimate_bytes(args, "bf16", 8192)
    assert weights_bf16 + kv_8k < estimate < 1.5 * (weights_bf16 + kv_8k)
    assert estimate_bytes(args, "fp32", 8192) > estimate > estimate_bytes(args, "bf16", 2048)


def test_driver_missing_is_an_ipex_driver_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(IPEXDriverError, match="Level Zero driver is missing.*fix: install Intel's GPU compute"):
        open_xpu(probes(tmp_path, FakeXpu(available=False), INTEL_ARC_ON_BUS))
    with pytest.raises(IPEXDriverError, match="index 3 does not exist; this machine has 1"):
        open_xpu(probes(tmp_path / "b", FakeXpu(), INTEL_ARC_ON_BUS), index=3)


@pytest.mark.slow
def test_instance_on_a_node_without_its_driver_falls_back_with_one_log_line(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    shard = Shard(node_id="n1", rank=0, start=0, end=30, num_layers=30, engine="ipex")
    bound = BoundInstance(instance=Instance(instance_id="i1", model="default", instance_type="IpexRing",
                                            shards=[shard]), node_id="n1")
    with caplog.at_level(logging.WARNING):
        engine = initialize_engine(bound, probes=probes(tmp_path, FakeXpu(available=False), INTEL_ARC_ON_BUS))
    assert engine.name == "torch"  # the CPU engine
    lines = [r.getMessage() for r in caplog.records if r.name == "ringlet.worker.engines.engine_init"]
    assert len(lines) == 1
    assert lines[0].startswith("instance i1: engine ipex cannot run here") and "Level Zero" in lines[0]
    assert lines[0].endswith("running on cpu instead")


@pytest.mark.slow
def test_without_ipex_an_intel_gpu_gets_torch_compile(cpu_reference_with_logits) -> None:  # type: ignore[no-untyped-def]
    engine = load_ipex_engine(None, device=XpuDevice(fake_runtime(FakeXpu())), config=SETTINGS)  # auto
    layers = engine.loaded.stage.args.num_hidden_layers
    assert engine.optimization == f"torch.compile of {3 * layers + 1} MLP and norm layers (native torch.xpu, no IPEX)"
    detail = compare_with_reference(engine, *cpu_reference_with_logits)
    # fused kernels sum in another order: fp32 rounding differences, far below any real preference
    assert_parting_is_a_near_tie(detail, 0.01)


@pytest.mark.slow
def test_tokenizer_wrapper_refuses_ids_the_model_has_no_embedding_for(xpu_engine) -> None:  # type: ignore[no-untyped-def]
    text = "Hello, world"
    assert xpu_engine.tokenizer.encode(text) == xpu_engine.loaded.stage.tokenizer.encode(text)
    narrow = IPEXTokenizerWrapper(xpu_engine.loaded.stage.tokenizer, embedding_rows=1000)
    assert narrow.apply_chat_template([{"role": "user", "content": "hi"}]) \
        == xpu_engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="beyond the model's 1000 embedding rows"):
        narrow.encode("Hello, world: tokenizers")


@pytest.mark.slow
def test_a_forced_tool_call_with_logprobs_on_the_intel_gpu(xpu_engine) -> None:  # type: ignore[no-untyped-def]
    """The tools reach the prompt, the call's grammar holds the sampler, and logprobs come back, on the XPU path."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    weather = FunctionSpec(name="get_weather", description="The weather in a city", parameters=schema)
    task = TextGenerationTask(task_id="tool", messages=[ChatMessage(role="user", content="Weather in Paris?")],
                              tools=[weather], max_tokens=40,
                              sampling=SamplingParams(temperature=0, constraint=named_call_constraint(weather),
                                                      logprobs=2))
    chunks = list(xpu_engine.generate(task))
    text = "".join(c.text for c in chunks)
    jsonschema_rs.validate(schema, json.loads(text))
    assert chunks[-1].finish_reason == "stop"
    messages, extra = template_inputs(xpu_engine.tokenizer.chat_template, task.messages or [], task.tools)
    assert '"name": "get_weather"' in xpu_engine.tokenizer.apply_chat_template(messages, **extra)
    logprobs = [t for c in chunks for t in c.logprobs or ()]
    assert "".join(t.token for t in logprobs) == text and all(len(t.top) == 2 for t in logprobs)
