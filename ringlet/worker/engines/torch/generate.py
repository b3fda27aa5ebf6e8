"""The generation loop shared by the torch-based engines (CPU, CUDA, Intel XPU).

Tokenise, prefill in chunks (reusing the cached prefix of the previous request), then decode one
token at a time: sample, detokenise, watch for end-of-sequence and stop strings, stream chunks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator

import torch

from ringlet.models.sampling import RequestSampler
from ringlet.models.stop import StopMatcher
from ringlet.models.tokenizer import StreamingDetokenizer, Tokenizer
from ringlet.models.tools import template_inputs
from ringlet.shared.errors import ContextWindowError
from ringlet.shared.tasks import GenerationChunk, SamplingParams, TextGenerationTask, Timings, TokenLogprob, Usage

# forward(token_ids [1, L], start_position) -> logits of the last position [1, V]
Forward = Callable[[torch.Tensor, int], torch.Tensor]
# fill(token_ids [1, L], start_position): a prompt chunk into the cache; nothing is read back
Fill = Callable[[torch.Tensor, int], object]


# sampler_for(params, prompt_ids) -> the sampler of one request: next token ids [1] from last-position logits
SamplerFor = Callable[[SamplingParams, list[int]], Callable[[torch.Tensor], torch.Tensor]]


def choice_sampling(params: SamplingParams, choice: int) -> SamplingParams:
    """Choice i of a seeded request samples with seed + i: every choice reproducible, no two alike."""
    if choice == 0 or params.seed is None:
        return params
    return params.model_copy(update={"seed": (params.seed + choice) % 2**63})


def request_context(task: TextGenerationTask, context: int) -> int:
    """The context window a task runs in: the instance's `context`, or the task's own smaller one (a larger one is a
    ContextWindowError saying how to get it)."""
    asked = task.context_window
    if asked is None or asked == context:
        return context
    if asked > context:
        raise ContextWindowError(
            f"the request asks for a context window of {asked} tokens (num_ctx) but the instance holds {context}; "
            f"place an instance with max_context {asked} (POST /instance, or ringlet node --max-context {asked}), "
            "or ask for less")
    return asked


def prompt_ids(tokenizer: Tokenizer, task: TextGenerationTask) -> list[int]:
    if task.messages is not None:
        messages, extra = template_inputs(tokenizer.chat_template, task.messages, task.tools)
        if task.thinking_switch is not None:
            extra["enable_thinking"] = task.thinking_switch
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra)
        return tokenizer.encode(text, add_special_tokens=False)
    assert task.prompt is not None
    return tokenizer.encode(task.prompt, add_special_tokens=True)


class TextGenerator:
    """Runs tasks one at a time against a model whose KV cache holds `context_length` positions."""

    def __init__(
        self, forward: Forward, tokenizer: Tokenizer, context_length: int, vocab_size: int,
        device: torch.device | str = "cpu", prefill_chunk: int = 512, lookahead: bool = False,
        fill: Fill | None = None, sampler_for: SamplerFor | None = None,
    ) -> None:
        """`fill` runs the prompt chunks whose output is not used (default: `forward`); `sampler_for` makes each
        request's sampler (default: sample here, on `device`). A pipeline's last stage samples: its rank 0 gets
        token ids from `forward` and a sampler that passes them through."""
        self.forward, self.tokenizer = forward, tokenizer
        self.fill = fill or forward
        self.sampler_for = sampler_for or (lambda params, ids: RequestSampler(params, ids, vocab_size, self.device,
                                                                                      tokenizer))
        self.context_length, self.vocab_size = context_length, vocab_size
        self.device, self.prefill_chunk = torch.device(device), prefill_chunk
        self.cached: list[int] = []  # tokens whose keys/values are in the cache, in order
        self.eos = set(tokenizer.eos_token_ids)
        # lookahead (GPUs): step t+1 is queued before token t is read back, so the device never waits
        # for the host; a finished request has computed one step it does not use.
        self.lookahead = lookahead
        if lookahead:
            self._host_token = torch.zeros(1, dtype=torch.long, pin_memory=True)
            self._copied = torch.cuda.Event()

    def check_fits(self, ids: list[int], context: int | None = None) -> None:
        """The prompt `ids` leaves room for an answer in `context` (default: the model's context window)."""
        context = context or self.context_length
        if not ids:
            raise ValueError("the prompt has no tokens (empty, or only characters the tokenizer drops); send some text")
        if len(ids) >= context:
            raise ContextWindowError(
                f"the prompt has {len(ids)} tokens but the context window is {context}; shorten the prompt")

    def _prefill(self, ids: list[int]) -> torch.Tensor:
        """Fill the cache with the prompt and return the logits of its last token.

        The cached prefix of the previous request is reused. The last prompt token always runs alone,
        as a decode step does: its logits are then computed the same way whether or not the prefix was
        cached, so a seeded request gives the same answer every time, even in bf16.
        """
        reuse = 0
        for a, b in zip(self.cached, ids[:-1]):
            if a != b:
                break
            reuse += 1
        self.cached = self.cached[:reuse]
        for begin in range(reuse, len(ids) - 1, self.prefill_chunk):
            chunk = ids[begin: min(begin + self.prefill_chunk, len(ids) - 1)]
            self.fill(torch.tensor([chunk], device=self.device), begin)
            self.cached.extend(chunk)
        logits = self.forward(torch.tensor([ids[-1:]], device=self.device), len(ids) - 1)
        self.cached.append(ids[-1])
        return logits

    def _read_while_stepping(self, token: torch.Tensor) -> tuple[int, torch.Tensor]:
        self._host_token.copy_(token.view(1), non_blocking=True)
        self._copied.record()
        logits = self.forward(token.view(1, 1), len(self.cached))
        self._copied.synchronize()
        return int(self._host_token[0]), logits

    def generate(self, task: TextGenerationTask) -> Generator[GenerationChunk, None, None]:
        """The task's choices one after another (the second and later reuse the cached prompt)."""
        ids = prompt_ids(self.tokenizer, task)
        context = request_context(task, self.context_length)
        self.check_fits(ids, context)
        for choice in range(task.n):
            yield from self._generate_choice(task, ids, choice, context)

    def _generate_choice(self, task: TextGenerationTask, ids: list[int], choice: int, context: int
                         ) -> Generator[GenerationChunk, None, None]:
        room = context - len(ids)
        max_tokens = min(task.max_tokens or room, room)
        sampler = self.sampler_for(choice_sampling(task.sampling, choice), ids)

        started = time.perf_counter()
        logits: torch.Tensor | None  # None: the next step's logits are not computed yet
        logits = self._prefill(ids)
        detok, stops = StreamingDetokenizer(self.tokenizer), StopMatcher(task.stop)
        first_token_at, finish, generated = 0.0, "length", 0
        pending: list[TokenLogprob] = []  # log-probabilities of tokens whose text is not out yet
        while generated < max_tokens:
            token = sampler(logits)
            generated += 1
            more = generated < max_tokens
            if self.lookahead and more:
                token_id, logits = self._read_while_stepping(token)
            else:
                token_id, logits = int(token.item()), None
            if generated == 1:
                first_token_at = time.perf_counter()
            if token_id in self.eos and not task.ignore_eos:
                finish = "error" if getattr(sampler, "failure", None) else "stop"
                break
            if task.sampling.logprobs is not None and (logprob := getattr(sampler, "last_logprobs", None)):
                pending.append(logprob)
            text = stops.feed(detok.add_token(token_id))
            if text:
                yield GenerationChunk(task_id=task.task_id, choice=choice, text=text, token_id=token_id,
                                      logprobs=pending or None)
                pending = []
            if stops.stopped:
                finish = "stop"
                break
            if not more:
                break
            if logits is None:
                logits = self.forward(token.view(1, 1), len(self.cached))
            self.cached.append(token_id)
        tail = "" if stops.stopped else stops.feed(detok.finalize()) + stops.flush()
        done = time.perf_counter()
        prefill_s = max(first_token_at - started, 1e-9) if generated else done - started
        decode_s = done - first_token_at if generated > 1 else 0.0
        yield GenerationChunk(
            task_id=task.task_id, choice=choice, text=tail, finish_reason=finish, last=choice == task.n - 1,
            stop_sequence=stops.matched, logprobs=pending or None,
            usage=Usage(prompt_tokens=len(ids), completion_tokens=generated),
            timings=Timings(
                time_to_first_token_s=prefill_s,
                prefill_tokens_per_s=len(ids) / prefill_s,
                decode_tokens_per_s=(generated - 1) / decode_s if decode_s > 0 else 0.0,
            ),
        )
