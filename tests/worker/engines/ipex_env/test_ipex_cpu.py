"""The real IPEX code path: torch 2.8 + intel-extension-for-pytorch 2.8 on this Xeon's CPU backend.

Runs inside .venv-ipex only (scripts/setup-ipex.sh builds it; tests/worker/engines/test_ipex_env.py starts it).
The reference is the CPU engine in fp32 on the embedded model. In fp32 IPEX must give the same greedy
tokens. In bf16 and int8 rounding differs, so the greedy streams may part: the test finds where, and
checks the parting is a near-tie: along the whole reference stream, the IPEX model ranks each reference
token within a logit tolerance of its own best token.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ringlet.shared.config import EngineConfig
from ringlet.worker.engines.engine_utils import ipex_status
from ringlet.worker.engines.ipex import IPEXEngineError
from ringlet.worker.engines.ipex.engine import IpexEngine
from ringlet.worker.engines.ipex.utils_ipex import load_ipex_engine
from tests.support.greedy import assert_parting_is_a_near_tie, compare_with_reference, greedy_task, run_greedy

# Largest gap allowed between the IPEX model's best logit and its logit for the reference token, at any
# step of the reference stream, and largest fp32 margin of the reference where the streams part.
# bf16 carries 8 significant bits: at these logits' magnitude (4..32) one step is 0.03 to 0.125.
LOGIT_TOLERANCE = {"bf16": 0.25, "int8": 0.5}

REPORT = Path(os.environ.get("RINGLET_IPEX_REPORT", "ipex-report.json"))


def record(key: str, value: object) -> None:
    report = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    report[key] = value
    REPORT.write_text(json.dumps(report, indent=2))


def ipex_layer_types(engine: IpexEngine) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module in engine.loaded.model.modules():  # type: ignore[attr-defined]
        if type(module).__module__.startswith("intel_extension_for_pytorch"):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts


def test_ipex_is_importable_and_matches_torch() -> None:
    status = ipex_status()
    assert status.usable, status.reason
    assert status.version is not None and status.version.startswith("2.8") and torch.__version__.startswith("2.8")
    record("versions", {"torch": torch.__version__, "ipex": status.version})


def test_fp32_through_ipex_optimize_gives_the_cpu_engines_greedy_tokens(cpu_reference_with_logits) -> None:  # type: ignore[no-untyped-def]
    reference = cpu_reference_with_logits[0]
    engine = load_ipex_engine(None, device="cpu", config=EngineConfig(precision="fp32"), optimization="ipex")
    layers = ipex_layer_types(engine)
    assert engine.optimization.startswith("ipex.optimize (fp32)"), engine.optimization
    blocks = engine.loaded.stage.args.num_hidden_layers
    assert layers.get("_IPEXLinear", 0) >= 4 * blocks, layers  # every block's qkv, o, gate_up, down prepacked
    run = run_greedy(engine, greedy_task())
    record("fp32", {"optimization": engine.optimization, "ipex_layers": layers, "text": run.text,
                    "identical_tokens": run.generated == reference.generated, "of": len(reference.generated)})
    assert run.generated == reference.generated and run.text == reference.text


@pytest.mark.parametrize("precision, layer_type", [("bf16", "_IPEXLinear"), ("int8", "WeightOnlyQuantizedLinear")])
def test_low_precision_divergence_is_a_near_tie(cpu_reference_with_logits, precision: str, layer_type: str) -> None:  # type: ignore[no-untyped-def]
    import intel_extension_for_pytorch as ipex

    if precision == "bf16" and not ipex._C.onednn_has_bf16_support():  # a CPU without AVX-512 (detected, here)
        with pytest.raises(IPEXEngineError, match="cannot run bf16 on this CPU.*use --precision fp32 or int8"):
            load_ipex_engine(None, device="cpu", config=EngineConfig(precision=precision), optimization="ipex")
        record(precision, {"refused": "IPEX's oneDNN has no bf16 kernels for this CPU"})
        return
    engine = load_ipex_engine(None, device="cpu", config=EngineConfig(precision=precision), optimization="ipex")
    layers = ipex_layer_types(engine)
    assert layers.get(layer_type, 0) >= 4 * engine.loaded.stage.args.num_hidden_layers, layers
    detail = compare_with_reference(engine, *cpu_reference_with_logits)
    record(precision, {"optimization": engine.optimization, "ipex_layers": layers, **detail})
    assert_parting_is_a_near_tie(detail, LOGIT_TOLERANCE[precision])
