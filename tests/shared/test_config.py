"""The engine settings: read once from the environment, flags over them, a clear error for a bad value."""

from __future__ import annotations

import pytest

from ringlet.shared.config import DEFAULT_MAX_CONTEXT, EngineConfig


def test_defaults_without_any_variable() -> None:
    config = EngineConfig.from_environment({})
    assert config == EngineConfig()
    assert (config.precision, config.max_context, config.cpu_compile, config.cuda_decode, config.cuda_compile) == (
        "auto", DEFAULT_MAX_CONTEXT, True, "fused", "tuned")


def test_every_variable_is_read_and_a_flag_wins() -> None:
    env = {"RINGLET_PRECISION": "int4", "RINGLET_CPU_COMPILE": "0", "RINGLET_CUDA_DECODE": "compiled",
           "RINGLET_CUDA_COMPILE": "max-autotune", "RINGLET_MAX_BATCH": "8", "RINGLET_MAX_STEP_TOKENS": "256",
           "RINGLET_MAX_QUEUED": "3", "RINGLET_KV_CACHE_TOKENS": "4096", "RINGLET_MAX_INSTANCES": "2",
           "RINGLET_RUNNER_STALL_S": "5", "RINGLET_RUNNER_RESTARTS": "0", "RINGLET_STREAM_IDLE_S": "9",
           "RINGLET_BURST_PAUSE_MS": "0", "RINGLET_REPLACE_GRACE_S": "4"}
    config = EngineConfig.from_environment(env)
    assert (config.precision, config.cpu_compile, config.cuda_decode, config.cuda_compile) == (
        "int4", False, "compiled", "max-autotune")
    assert (config.max_batch, config.max_step_tokens, config.max_queued, config.kv_cache_tokens,
            config.max_instances, config.runner_stall_s, config.runner_restarts, config.stream_idle_s,
            config.burst_pause_ms, config.replace_grace_s) == (8, 256, 3, 4096, 2, 5, 0, 9, 0, 4)
    assert EngineConfig.from_environment(env, precision="fp32", max_context=512).precision == "fp32"
    assert EngineConfig.from_environment(env, precision=None).precision == "int4", "an unset flag keeps the variable"


@pytest.mark.parametrize(("env", "message"), [
    ({"RINGLET_PRECISION": "int3"}, "RINGLET_PRECISION='int3' is not one of auto, fp32, bf16, fp16, int8, int4"),
    ({"RINGLET_CUDA_DECODE": "fast"}, "RINGLET_CUDA_DECODE='fast' is not one of fused, compiled"),
    ({"RINGLET_CUDA_COMPILE": "max"}, "RINGLET_CUDA_COMPILE='max' is not one of default, tuned, max-autotune"),
    ({"RINGLET_MAX_STEP_TOKENS": "lots"}, "RINGLET_MAX_STEP_TOKENS='lots' is not a whole number"),
])
def test_a_bad_value_names_the_variable_and_its_choices(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as error:
        EngineConfig.from_environment(env)
    assert str(error.value) == message


def test_a_bad_flag_is_a_value_error_too() -> None:
    with pytest.raises(ValueError, match="max_context"):
        EngineConfig.from_environment({}, max_context=3)
