"""Continuous batching on MLX through mlx-lm's own `BatchGenerator`.

mlx-lm computes the batch: it admits prompts, prefills them together and decodes every running sequence in one
step, each sequence with its own KV cache, and it computes the next step before handing back this one's tokens.
Around it ringlet keeps what every engine does: each choice's sampler (mlx-lm's top-k/top-p/min-p filters, with
a random key of its own for a seeded request), its penalties (mlx-lm's logits processors, over the last 20
tokens), the end-of-sequence tokens, stop strings, `max_tokens`, usage and timings; a cancelled task's sequences
leave the batch at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ringlet.models.grammar import TokenMask
from ringlet.models.sampling import token_logprobs
from ringlet.models.stop import StopMatcher
from ringlet.models.tokenizer import StreamingDetokenizer, Tokenizer
from ringlet.shared.errors import ContextWindowError
from ringlet.shared.messages import BatchStats
from ringlet.shared.tasks import GenerationChunk, SamplingParams, TextGenerationTask, TokenLogprob
from ringlet.worker.batching import Choice, TaskState, feed_token, last_chunk
from ringlet.worker.engines.torch.generate import choice_sampling, prompt_ids, request_context


@dataclass(eq=False)
class _Running:
    choice: Choice
    prompt_length: int
    generated: int = 0


class MlxBatchGenerator:
    """The batching loop's generator for an MLX engine (the interface of `worker.batching.BatchGenerator` that
    `worker.runner.serve_batched` uses)."""

    depth = 1

    def __init__(self, engine: Any, max_running: int = 64) -> None:
        from mlx_lm.generate import BatchGenerator, StopSequences

        self.engine, self.tokenizer = engine, engine.tokenizer
        self.eos = set(engine.tokenizer.eos_token_ids)
        # ends of sequences are watched here (an ignore_eos request goes on past them)
        self._no_stop_tokens = StopSequences(None)
        self.batch = BatchGenerator(engine.model, completion_batch_size=max_running,
                                    prefill_batch_size=min(8, max_running), prefill_step_size=512)
        self.running: dict[int, _Running] = {}  # mlx-lm's uid -> the choice
        self._pending: list[Any] | None = None
        self.last_step_tokens = 0

    def __bool__(self) -> bool:
        return bool(self.running)

    @property
    def in_flight(self) -> int:
        return int(self._pending is not None)

    def running_ids(self) -> set[str]:
        return {r.choice.of.task.task_id for r in self.running.values()}

    def task_ids(self) -> list[str]:
        return list(dict.fromkeys(r.choice.of.task.task_id for r in self.running.values()))

    def stats(self) -> BatchStats:
        return BatchStats(running=len(self.running), waiting=0, step_tokens=self.last_step_tokens, kv_blocks_used=0,
                          kv_blocks=0, preemptions=0)

    def submit(self, task: TextGenerationTask) -> None:
        ids = prompt_ids(self.tokenizer, task)
        if not ids:
            raise ValueError("the prompt has no tokens (empty, or only characters the tokenizer drops); send some text")
        context = request_context(task, self.engine.context_length)
        if len(ids) >= context:
            raise ContextWindowError(f"the prompt has {len(ids)} tokens but the context window is {context}; "
                                     "shorten the prompt")
        room = context - len(ids)
        state, arrived_at = TaskState(task, task.n), time.perf_counter()
        choices = [Choice(state, i, i, min(task.max_tokens or room, room), _unused_sampler,
                          StreamingDetokenizer(self.tokenizer), StopMatcher(task.stop), arrived_at)
                   for i in range(task.n)]
        params = [choice_sampling(task.sampling, i) for i in range(task.n)]
        uids = self.batch.insert(
            [list(ids) for _ in choices], max_tokens=[c.max_tokens for c in choices],
            samplers=[mlx_sampler(p) for p in params],
            logits_processors=[mlx_processors(p, self.tokenizer, self.engine.generator.vocab_size) for p in params],
            stop_sequences=[self._no_stop_tokens] * len(choices))
        for uid, choice in zip(uids, choices, strict=True):
            self.running[uid] = _Running(choice, len(ids))

    def cancel(self, task_id: str) -> bool:
        uids = [uid for uid, r in self.running.items() if r.choice.of.task.task_id == task_id]
        if uids:
            self.batch.remove(uids)
            for uid in uids:
                del self.running[uid]
        return bool(uids)

    def launch(self) -> int:
        """Start mlx-lm's next step (it keeps one in flight); how many it started."""
        if self._pending is not None or not self.running:
            return 0
        _, self._pending = self.batch.next()
        return 1

    def collect(self) -> list[GenerationChunk]:
        responses, self._pending = self._pending or [], None
        self.last_step_tokens = len(responses)
        out: list[GenerationChunk] = []
        for response in responses:
            running = self.running.get(response.uid)
            if running is None:  # cancelled while its step was computed
                continue
            running.generated += 1
            asked = running.choice.of.task.sampling.logprobs
            logprob = None if asked is None else _logprob(response, asked, self.tokenizer)
            chunk, finish = feed_token(running.choice, int(response.token), running.generated, self.eos, logprob)
            if chunk is not None:
                out.append(chunk)
            if finish is None and response.finish_reason is not None:
                finish = "length"
            if finish is not None:
                if response.finish_reason is None:
                    self.batch.remove([response.uid])
                del self.running[response.uid]
                out.append(last_chunk(running.choice, running.prompt_length, running.generated, finish))
        return out

    def step(self) -> list[GenerationChunk]:
        self.launch()
        return self.collect() if self.in_flight else []

    def close(self) -> None:
        self.batch.close()


def mlx_sampler(params: SamplingParams) -> Any:
    """A sampler of log-probabilities [1, V] for mlx-lm, or None for greedy (mlx-lm's own, one argmax for every
    greedy row). Temperature first, then top-k, top-p and min-p, as the torch engines do; a seed gives the
    request its own random key."""
    if params.greedy:
        return None
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    key = [mx.random.key(params.seed)] if params.seed is not None else None

    def sample(logprobs: Any) -> Any:
        x = logprobs / params.temperature
        x = x - mx.logsumexp(x, axis=-1, keepdims=True)
        if params.top_k > 0:
            x = apply_top_k(x, params.top_k)
        if 0 < params.top_p < 1:
            x = apply_top_p(x, params.top_p)
        if params.min_p > 0:
            x = apply_min_p(x, params.min_p)
        if key is None:
            return mx.random.categorical(x)
        keys = mx.random.split(key[0])
        key[0], draw = keys[0], keys[1]
        return mx.random.categorical(x, key=draw)

    return sample


_WHOLE_SEQUENCE = 1 << 30


def mlx_processors(params: SamplingParams, tokenizer: Tokenizer, vocab_size: int) -> list[Any]:
    from mlx_lm.sample_utils import make_logits_processors

    # mlx-lm's penalties look at a window of the sequence's tokens (its default: 20); without one, at all of them
    window = params.penalty_window or _WHOLE_SEQUENCE
    processors = make_logits_processors(
        logit_bias=dict(params.logit_bias) if params.logit_bias else None,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1.0 else None,
        repetition_context_size=window, presence_penalty=params.presence_penalty or None,
        presence_context_size=window, frequency_penalty=params.frequency_penalty or None,
        frequency_context_size=window)
    if params.constraint is not None:
        processors.append(_grammar_processor(TokenMask(params.constraint, tokenizer, vocab_size)))
    return list(processors)


def _grammar_processor(mask: TokenMask) -> Any:
    """A logits processor for mlx-lm holding a sequence to its grammar. mlx-lm calls it before each draw with the
    sequence's tokens, whose last is the one just fed in: the token drawn at the step before (at the first call,
    the prompt's last)."""
    import mlx.core as mx

    started = [False]

    def process(tokens: Any, logits: Any) -> Any:
        if started[0]:
            mask.advance(int(tokens[-1].item()))
        started[0] = True
        width = logits.shape[-1]
        mask_bits = np.unpackbits(mask.next_bits().view(np.uint8), bitorder="little")[:width]
        return mx.where(mx.array(mask_bits.astype(bool))[None, :], logits, -mx.inf)

    return process


def _logprob(response: Any, top: int, tokenizer: Tokenizer) -> TokenLogprob:
    """The drawn token's log-probability from mlx-lm's response (its log-probabilities over the vocabulary)."""
    import torch

    return token_logprobs(torch.from_numpy(np.array(response.logprobs, dtype=np.float32)).view(-1),
                          int(response.token), top, tokenizer)


def _unused_sampler(logits: Any) -> Any:
    raise AssertionError("mlx-lm samples an MLX batch's tokens")
