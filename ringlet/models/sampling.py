"""Sampling as pure tensor functions: penalties, temperature, top-k / top-p / min-p, then a draw.

Everything stays on the device (no .item() per token): the draw uses the exponential-race trick,
argmax(p / E) with E ~ Exp(1), which samples from p and takes a seeded torch.Generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ringlet.shared.tasks import SamplingParams


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor, output_counts: torch.Tensor
) -> torch.Tensor:
    """seen: [B, V] bool, tokens in prompt or output; output_counts: [B, V] counts of output tokens."""
    if params.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if params.frequency_penalty:
        logits = logits - params.frequency_penalty * output_counts
    if params.presence_penalty:
        logits = logits - params.presence_penalty * (output_counts > 0).to(logits.dtype)
    return logits


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # drop a token when the tokens before it already reach p; the most likely token always stays
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


@dataclass
class Sampler:
    """Draws the next token of each sequence from last-position logits [B, V]."""

    params: SamplingParams
    generator: torch.Generator | None

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor, output_counts: torch.Tensor) -> torch.Tensor:
        p = self.params
        logits = apply_penalties(logits.float(), p, seen, output_counts)
        if p.greedy:
            return logits.argmax(dim=-1)
        logits = apply_min_p(apply_top_p(apply_top_k(logits / p.temperature, p.top_k), p.top_p), p.min_p)
        probs = logits.softmax(dim=-1)
        race = torch.empty_like(probs).exponential_(generator=self.generator)
        return (probs / race).argmax(dim=-1)

    @property
    def needs_history(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or bool(p.frequency_penalty) or bool(p.presence_penalty)


def make_sampler(params: SamplingParams, device: torch.device | str = "cpu") -> Sampler:
    generator = None
    if params.seed is not None and not params.greedy:
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed)
    return Sampler(params, generator)


class RequestSampler:
    """One request's sampler with the token history its penalties need (prompt and output tokens so far)."""

    def __init__(self, params: SamplingParams, prompt: list[int], vocab_size: int,
                 device: torch.device | str = "cpu") -> None:
        self.sampler = make_sampler(params, device)
        self.seen = self.output_counts = torch.zeros(0)
        if self.sampler.needs_history:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(prompt, device=device)] = True
            self.output_counts = torch.zeros(1, vocab_size, device=device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        token = self.sampler(logits, self.seen, self.output_counts)
        if self.sampler.needs_history:
            self.seen[0, token] = True
            self.output_counts[0, token] += 1
        return token
