"""One stage of a ring, as its own process, for the data-plane tests (no node, no control plane).

argv: the bound instance as JSON, then the rendezvous address as HOST:PORT, or "host" on rank 0, which prints the
address it listens on as its first line. Rank 0 then runs the prompts of argv[3] (a JSON list) one request after
another, with argv[4] tokens at most, greedily or with the sampling parameters of argv[5] (JSON), and prints the
chunks as JSON lines."""

from __future__ import annotations

import json
import sys

from ringlet.net.ring import host_store, join_store
from ringlet.shared.config import EngineConfig
from ringlet.shared.instances import BoundInstance
from ringlet.shared.state import RingAddress
from ringlet.shared.tasks import SamplingParams, TextGenerationTask
from ringlet.worker.stages import FirstStage, RelayStage, load_for_stage


def main() -> None:
    bound = BoundInstance.model_validate_json(sys.argv[1])
    size = len(bound.instance.shards)
    if bound.shard.is_first:
        store, address = host_store("127.0.0.1", size)
        print(address.model_dump_json(), flush=True)
        stage, _ = load_for_stage(bound, EngineConfig(precision="fp32"))
        engine = FirstStage(bound, stage, store)
        sampling = SamplingParams.model_validate_json(sys.argv[5]) if len(sys.argv) > 5 else SamplingParams(
            temperature=0)
        for request, prompt in enumerate(json.loads(sys.argv[3])):
            task = TextGenerationTask(prompt=prompt, max_tokens=int(sys.argv[4]), sampling=sampling)
            for chunk in engine.generate(task):
                print(json.dumps({"request": request, "token_id": chunk.token_id, "text": chunk.text,
                                  "decode_tps": chunk.timings.decode_tokens_per_s if chunk.timings else None}),
                      flush=True)
        engine.close()
    else:
        address = RingAddress.model_validate_json(sys.argv[2])
        stage, _ = load_for_stage(bound, EngineConfig(precision="fp32"))
        RelayStage(bound, stage, join_store(address, size)).serve()


if __name__ == "__main__":
    main()
