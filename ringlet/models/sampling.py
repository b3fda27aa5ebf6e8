"""Sampling as pure tensor functions: penalties, temperature, top-k / top-p / min-p, then a draw.

Everything stays on the device (no .item() per token): the draw inverts the cumulative distribution at one
seeded uniform number per row. On the CPU, the few steps that torch runs slowly over a whole vocabulary (argmax,
sort, top-k: ~0.1-7 ms for 49k entries on one core, against 5-250 us in numpy's SIMD kernels) go through numpy
on the same memory, and the penalties touch only the tokens seen so far. A constrained request is the exception: its
grammar (`grammar.py`) reads each token drawn on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from ringlet.shared.tasks import SamplingParams, TokenLogprob, TopLogprob

if TYPE_CHECKING:
    from ringlet.models.grammar import TokenMask
    from ringlet.models.tokenizer import Tokenizer


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, history: torch.Tensor, output_counts: torch.Tensor
) -> torch.Tensor:
    """history: [B, N] ids of the tokens in prompt and output (repeats allowed); output_counts: [B, V] counts of
    output tokens."""
    if params.repetition_penalty != 1.0 and history.numel():
        seen = logits.gather(-1, history)
        penalised = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
        # a repeated id writes the same value twice
        logits = logits.scatter(-1, history, penalised)
    if params.frequency_penalty:
        logits = logits - params.frequency_penalty * output_counts
    if params.presence_penalty:
        logits = logits - params.presence_penalty * output_counts.clamp(max=1)
    return logits


def _numpy_runs(x: torch.Tensor) -> bool:
    """float32 on the CPU: numpy's kernels read the tensor's memory as it is."""
    return x.device.type == "cpu" and x.dtype == torch.float32


def argmax(x: torch.Tensor) -> torch.Tensor:
    """argmax over the last dimension (the first of equal maxima)."""
    if _numpy_runs(x):
        return torch.from_numpy(np.asarray(x.numpy().argmax(axis=-1)))
    return x.argmax(dim=-1)


def kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """[B, 1]: each row's k-th largest value."""
    if _numpy_runs(x):
        size = x.shape[-1]
        return torch.from_numpy(np.partition(x.numpy(), size - k, axis=-1)[..., size - k:size - k + 1])
    return torch.topk(x, k, dim=-1).values[..., -1:]


def sort_descending(x: torch.Tensor) -> torch.Tensor:
    """Each row's values, largest first."""
    if _numpy_runs(x):
        return torch.from_numpy(np.ascontiguousarray(np.sort(x.numpy(), axis=-1)[..., ::-1]))
    return torch.sort(x, dim=-1, descending=True).values


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    return logits.masked_fill(logits < kth_largest(logits, k), float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities reach p (the most likely always stays);
    among tokens as likely as the last one kept, the first ones by id."""
    if p >= 1.0:
        return logits
    probs = logits.softmax(dim=-1)
    ordered = sort_descending(probs)
    # at least one: a p below float32's smallest number (the request's float64, 1e-300 say) compares as 0 here
    kept = ((ordered.cumsum(dim=-1) - ordered) < p).sum(dim=-1, keepdim=True).clamp_(min=1)
    cutoff = ordered.gather(-1, kept - 1)
    keep = probs > cutoff
    ties = probs == cutoff
    keep |= ties & (ties.cumsum(dim=-1) <= kept - keep.sum(dim=-1, keepdim=True))
    return logits.masked_fill(~keep, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One id per row of probs [B, V]: the first whose cumulative probability passes a uniform number in
    [0, total). float64, so that the sum over a large vocabulary keeps every token's share."""
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=torch.float64) * total
    u = torch.minimum(u, total.nextafter(torch.zeros_like(total)))  # u < total even where the product rounds up
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


@dataclass
class Sampler:
    """Draws the next token of each sequence from last-position logits [B, V]."""

    params: SamplingParams
    generator: torch.Generator | None
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias: token ids [N] and what to add [N]

    def __call__(self, logits: torch.Tensor, history: torch.Tensor, output_counts: torch.Tensor) -> torch.Tensor:
        return self.pick(self.process(logits, history, output_counts))

    def process(self, logits: torch.Tensor, history: torch.Tensor, output_counts: torch.Tensor) -> torch.Tensor:
        """The logits in float32 with the bias and the penalties applied (the distribution logprobs report)."""
        logits = logits.float()
        if self.bias is not None:
            ids, values = self.bias
            logits = logits.clone()  # the engine's logits stay as they are
            logits[..., ids] += values
        return apply_penalties(logits, self.params, history, output_counts)

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """The drawn token of each row of processed logits: temperature, top-k, top-p, min-p, then a draw."""
        p = self.params
        if p.greedy:
            return argmax(logits)
        logits = apply_min_p(apply_top_p(apply_top_k(logits / p.temperature, p.top_k), p.top_p), p.min_p)
        return draw(logits.softmax(dim=-1), self.generator)

    @property
    def needs_history(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or bool(p.frequency_penalty) or bool(p.presence_penalty)


def make_sampler(params: SamplingParams, device: torch.device | str = "cpu", vocab_size: int | None = None) -> Sampler:
    """The sampler of `params`; a logit_bias naming a token id the vocabulary (`vocab_size`) lacks is a ValueError."""
    generator = None
    if params.seed is not None and not params.greedy:
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed)
    bias = None
    if params.logit_bias:
        outside = sorted(t for t in params.logit_bias if vocab_size is not None and t >= vocab_size)
        if outside:
            raise ValueError(f"logit_bias names token ids {outside[:5]} beyond the model's {vocab_size} tokens")
        bias = (torch.tensor(list(params.logit_bias), dtype=torch.long, device=device),
                torch.tensor(list(params.logit_bias.values()), dtype=torch.float32, device=device))
    return Sampler(params, generator, bias)


class RequestSampler:
    """One request's sampler with the token history its penalties need (prompt and output tokens so far) and, for a
    constrained request (`SamplingParams.constraint`), its grammar's mask over each step's logits."""

    def __init__(self, params: SamplingParams, prompt: list[int], vocab_size: int,
                 device: torch.device | str = "cpu", tokenizer: Tokenizer | None = None) -> None:
        self.sampler = make_sampler(params, device, vocab_size)
        self.history = self.output_counts = torch.zeros(0)
        self.window = params.penalty_window
        if self.sampler.needs_history:
            self.history = torch.tensor([prompt], dtype=torch.long, device=device)
            self.output_counts = torch.zeros(1, vocab_size, device=device)
            if self.window is not None:  # the counts are of the window's tokens, the prompt's among them
                self.output_counts.scatter_add_(-1, self.history[:, -self.window:],
                                                torch.ones(1, min(self.window, len(prompt)), device=device))
        self.tokenizer = tokenizer
        self.last_logprobs: TokenLogprob | None = None  # the last token drawn's, when the request asks for them
        if params.logprobs is not None and tokenizer is None:
            raise ValueError("logprobs need the model's tokenizer where the request samples")
        self.mask: TokenMask | None = None
        if params.constraint is not None:
            if tokenizer is None:
                raise ValueError("constrained output needs the model's tokenizer where the request samples")
            from ringlet.models.grammar import TokenMask

            self.mask = TokenMask(params.constraint, tokenizer, vocab_size)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no penalties, bias or grammar: the argmax of the logits, which a batch takes for all such rows
        at once."""
        return (self.sampler.params.greedy and not self.sampler.needs_history and self.sampler.bias is None
                and self.mask is None and self.sampler.params.logprobs is None)

    @property
    def failure(self) -> str | None:
        """Why the request's grammar failed, if it did: its answer ends with finish reason "error"."""
        return self.mask.failure if self.mask is not None else None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            logits = self.mask.apply(logits.float().clone())
        history = self.history if self.window is None else self.history[:, -self.window:]
        processed = self.sampler.process(logits, history, self.output_counts)
        token = self.sampler.pick(processed)
        if self.sampler.params.logprobs is not None:
            self.last_logprobs = token_logprobs(processed[0], int(token.item()), self.sampler.params.logprobs,
                                                cast("Tokenizer", self.tokenizer))
        if self.sampler.needs_history:
            self.history = torch.cat((self.history, token.view(1, 1)), dim=-1)
            self.output_counts[0, token] += 1
            if self.window is not None and self.history.shape[-1] > self.window:
                self.output_counts[0, self.history[0, -self.window - 1]] -= 1  # it left the window
        if self.mask is not None:
            self.mask.advance(int(token.item()))
        return token


def token_logprobs(logits: torch.Tensor, token: int, top: int, tokenizer: Tokenizer) -> TokenLogprob:
    """The drawn `token`'s log-probability under `logits` [V] and the `top` most likely tokens' (texts decoded one
    token at a time, as OpenAI gives them)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logprobs, top) if top else None
    return TokenLogprob(
        token=tokenizer.decode([token]), logprob=float(logprobs[token]),
        top=[] if best is None else [TopLogprob(token=tokenizer.decode([i]), logprob=v)
                                     for v, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)])
