"""What only the real model can answer, through the official clients against a live node serving the embedded model:
it names Paris (whole and streamed), seeded sampling repeats, echo and streaming agree with the plain completion, and
the real tokenizer's 8192-token context window refuses a longer prompt. The API's contract is tested against a fake
node in tests/api/."""

from __future__ import annotations

import ollama
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.support.processes import LiveNode

pytestmark = pytest.mark.slow

QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(live_node: LiveNode) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_node.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_completion_names_paris(client: openai.OpenAI, model_id: str) -> None:
    reply = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=12, temperature=0)
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.prompt_tokens > 5 and 1 <= reply.usage.completion_tokens <= 12


def test_streamed_chat_names_paris_and_ends_with_usage(client: openai.OpenAI, model_id: str) -> None:
    chunks = list(client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None and 1 <= usage.completion_tokens <= 12


def test_seeded_sampling_with_penalties_repeats(client: openai.OpenAI, model_id: str) -> None:
    def sample(seed: int) -> str:
        reply = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=8, temperature=1.0,
                                               top_p=0.9, seed=seed, presence_penalty=0.5, frequency_penalty=0.5)
        return reply.choices[0].message.content or ""

    first = sample(1234)
    assert first and sample(1234) == first


def test_completions_with_echo_and_streaming_agree(client: openai.OpenAI, model_id: str) -> None:
    prompt = "The capital of France is"
    plain = client.completions.create(model=model_id, prompt=prompt, max_tokens=4, temperature=0).choices[0].text
    assert plain.strip()
    echoed = client.completions.create(model=model_id, prompt=prompt, max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + plain
    streamed = client.completions.create(model=model_id, prompt=prompt, max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == plain


def test_prompt_over_the_context_window_is_a_bad_request(client: openai.OpenAI, model_id: str) -> None:
    long_prompt = "hello " * 9000  # over 8192 tokens in the model's own tokenizer
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": long_prompt}],
                                       max_tokens=2)
    assert error.value.code == "context_length_exceeded" and "context window is 8192" in error.value.message


def test_ollama_chat_answers(live_node: LiveNode, model_id: str) -> None:
    reply = ollama.Client(host=live_node.url, timeout=120).chat(
        model=f"{model_id}:latest", messages=[{"role": "user", "content": "What is the capital of France?"}],
        options={"temperature": 0, "num_predict": 12})
    assert "Paris" in (reply.message.content or "")
    assert reply.done and reply.done_reason in ("stop", "length") and reply.eval_count and reply.prompt_eval_count
