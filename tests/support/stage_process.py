"""One stage of a ring, as its own process, for the data-plane tests (no node, no control plane).

argv: the bound instance as JSON; "host" on rank 0, which prints the address it listens on as its first line, else
"join", and the address comes as the first line of stdin (so every stage starts, and imports, at once); the
EngineConfig as JSON. Rank 0 then runs the job of argv[4] (JSON, `Job`) and
prints the chunks as JSON lines (a batched run ends with a line of its preemptions and the most steps it had in
flight). A ring of torch stages runs its requests together, each joining `stagger` steps
after the one before (several steps in flight round the ring); a ring with an MLX stage runs them one after another.
"""

from __future__ import annotations

import json
import sys

from pydantic import BaseModel

from ringlet.net.ring import host_store, join_store
from ringlet.shared.config import EngineConfig
from ringlet.shared.instances import BoundInstance
from ringlet.shared.state import RingAddress
from ringlet.shared.tasks import GenerationChunk, SamplingParams, TextGenerationTask
from ringlet.worker.batching import BatchGenerator
from ringlet.worker.pipeline import PipelineHead, PipelineStage, batches, load_stage_engine
from ringlet.worker.stages import FirstStage, RelayStage, load_for_stage


class Job(BaseModel):
    prompts: list[str]
    max_tokens: int
    sampling: SamplingParams = SamplingParams(temperature=0)
    stagger: int = 2  # steps between one request joining the batch and the next
    step_tokens: int = 512  # the batch's token budget a step (small: prompts go in chunks, beside decodes)
    cancel: dict[int, int] = {}  # request -> the step before which it is cancelled (its step may be in flight)


def emit(request: int, chunk: GenerationChunk) -> None:
    print(json.dumps({"request": request, "token_id": chunk.token_id, "text": chunk.text,
                      "decode_tps": chunk.timings.decode_tokens_per_s if chunk.timings else None,
                      "logprobs": [t.model_dump() for t in chunk.logprobs or ()],
                      "finish_reason": chunk.finish_reason}), flush=True)


def run_batched(head: PipelineHead, job: Job) -> None:
    generator = BatchGenerator(head, job.step_tokens, head.config.max_batch)
    tasks = [TextGenerationTask(task_id=f"request-{i}", prompt=prompt, max_tokens=job.max_tokens,
                                sampling=job.sampling) for i, prompt in enumerate(job.prompts)]
    steps = most_in_flight = 0
    while tasks or generator:
        if tasks and steps >= job.stagger * (len(job.prompts) - len(tasks)):
            generator.submit(tasks.pop(0))
        for request, at in job.cancel.items():
            if at == steps:
                generator.cancel(f"request-{request}")
        generator.launch()
        most_in_flight = max(most_in_flight, generator.in_flight)
        for chunk in generator.collect() if generator.in_flight else []:
            emit(int(chunk.task_id.removeprefix("request-")), chunk)
        steps += 1
    print(json.dumps({"request": None, "preemptions": generator.stats().preemptions, "most_in_flight": most_in_flight}),
          flush=True)


def main() -> None:
    bound = BoundInstance.model_validate_json(sys.argv[1])
    config = EngineConfig.model_validate_json(sys.argv[3])
    size = len(bound.instance.shards)
    if bound.shard.is_first:
        store, address = host_store("127.0.0.1", size)
        print(address.model_dump_json(), flush=True)
        job = Job.model_validate_json(sys.argv[4])
        if batches(bound):
            head = PipelineHead(bound, load_stage_engine(bound, config, store)[0], store)
            run_batched(head, job)
            head.close()
            return
        stage, _ = load_for_stage(bound, config)
        engine = FirstStage(bound, stage, store)
        for request, prompt in enumerate(job.prompts):
            task = TextGenerationTask(prompt=prompt, max_tokens=job.max_tokens, sampling=job.sampling)
            for chunk in engine.generate(task):
                emit(request, chunk)
        engine.close()
    else:
        store = join_store(RingAddress.model_validate_json(sys.stdin.readline()), size)
        if batches(bound):
            PipelineStage(bound, load_stage_engine(bound, config, store)[0], store).serve()
        else:
            stage, _ = load_for_stage(bound, config)
            RelayStage(bound, stage, store).serve()


if __name__ == "__main__":
    main()
