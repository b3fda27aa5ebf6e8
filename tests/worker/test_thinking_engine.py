"""A real batching engine over a tiny random model whose tokenizer and Qwen3-style template know `<think>`: its
runner reports a model that thinks, with the switch, and a task's switch reaches the rendered prompt (the empty think
block Qwen3's template writes when thinking is off adds its two marker tokens)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from ringlet.models.loader import LoadedStage
from ringlet.models.random_checkpoint import random_weights
from ringlet.models.registry import build_stage, model_args
from ringlet.models.tokenizer import Tokenizer
from ringlet.shared.config import EngineConfig
from ringlet.shared.tasks import ChatMessage, SamplingParams, TextGenerationTask, ThinkingFormat
from ringlet.worker.batching import BatchGenerator
from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine
from ringlet.worker.runner import ready
from tests.support.tiny_model import CONFIG

MARKERS = ["<think>", "</think>", "<|im_start|>", "<|im_end|>"]  # the vocabulary's last ids; <|im_end|> ends a turn
QWEN3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def thinking_engine() -> TorchBatchEngine:
    args = model_args(CONFIG)
    words = args.vocab_size - len(MARKERS)
    vocab = {f"t{n}": n for n in range(words)} | {marker: words + i for i, marker in enumerate(MARKERS)}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    backend.add_tokens(MARKERS)  # matched inside text, with the ids above
    tokenizer = Tokenizer(backend, chat_template=QWEN3_TEMPLATE, eos_token_ids=[vocab["<|im_end|>"]])
    model = build_stage(args, weights=random_weights(args, torch.float32, "cpu", seed=1), dtype=torch.float32,
                        device="cpu")
    stage = LoadedStage(args, model, tokenizer, 0, args.num_hidden_layers)
    return TorchBatchEngine(stage, torch.device("cpu"), EngineConfig(kv_cache_tokens=4096))


def prompt_tokens(engine: TorchBatchEngine, thinking: bool | None) -> int:
    task = TextGenerationTask(task_id=f"task-{thinking}", messages=[ChatMessage(role="user", content="t5 t6 t7")],
                              max_tokens=2, sampling=SamplingParams(temperature=0.0), thinking=thinking)
    generator = BatchGenerator(engine, max_step_tokens=64, max_running=8)
    generator.submit(task)
    usage = None
    while generator:
        usage = next((c.usage for c in generator.step() if c.usage is not None), usage)
    assert usage is not None
    return usage.prompt_tokens


def test_the_runner_reports_thinking_and_the_switch_reaches_the_prompt() -> None:
    engine = thinking_engine()
    assert ready(engine, "cpu", engine.context_length, 0.0).thinking == ThinkingFormat(switch=True)
    default, on, off = (prompt_tokens(engine, thinking) for thinking in (None, True, False))
    assert default == on and off == on + 2, "thinking off: the template's empty <think></think> block"
