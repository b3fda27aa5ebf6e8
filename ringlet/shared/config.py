"""The engine settings of a node: read once from the environment (or the CLI's flags) where a process starts, then
carried to every runner inside its load message. Nothing below the runner reads the environment."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# the precision of weights (int8/int4: weight-only, with bf16 activations where the CPU has native bf16)
Precision = Literal["auto", "fp32", "bf16", "fp16", "int8", "int4"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
# which decode step a CUDA graph replays: fused Triton kernels where the model allows, or the model's own forward
# through torch.compile (every architecture)
CudaDecode = Literal["fused", "compiled"]
# how hard inductor tunes a compiled CUDA decode step: its heuristics; + coordinate-descent tuning of each kernel's
# launch parameters; + a benchmarked choice between cuBLAS and Triton templates for every matmul
CudaCompile = Literal["default", "tuned", "max-autotune"]

DEFAULT_MAX_CONTEXT = 8192

PRECISION_ENV = "RINGLET_PRECISION"
CPU_COMPILE_ENV = "RINGLET_CPU_COMPILE"
CUDA_DECODE_ENV = "RINGLET_CUDA_DECODE"
CUDA_COMPILE_ENV = "RINGLET_CUDA_COMPILE"


class EngineConfig(BaseModel):
    """How every engine and stage of a node loads and runs its model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    precision: Precision = "auto"
    max_context: int = Field(DEFAULT_MAX_CONTEXT, ge=16, description="positions of the KV cache (capped by the model)")
    cpu_compile: bool = Field(True, description="compile the CPU decode step at warm-up (False: decode eagerly)")
    cuda_decode: CudaDecode = "fused"
    cuda_compile: CudaCompile = "tuned"

    @classmethod
    def from_environment(cls, env: Mapping[str, str], **overrides: object) -> EngineConfig:
        """The settings in `env` (RINGLET_PRECISION, RINGLET_CPU_COMPILE=0, RINGLET_CUDA_DECODE,
        RINGLET_CUDA_COMPILE), then `overrides` (a CLI flag wins); ValueError names the variable and its choices."""
        values: dict[str, object] = {}
        for name, field, choices in ((PRECISION_ENV, "precision", PRECISIONS),
                                     (CUDA_DECODE_ENV, "cuda_decode", get_args(CudaDecode)),
                                     (CUDA_COMPILE_ENV, "cuda_compile", get_args(CudaCompile))):
            raw = env.get(name, "").strip()
            if raw:
                if raw not in choices:
                    raise ValueError(f"{name}={raw!r} is not one of {', '.join(choices)}")
                values[field] = raw
        if env.get(CPU_COMPILE_ENV, "").strip() == "0":
            values["cpu_compile"] = False
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            first = error.errors()[0]
            raise ValueError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
