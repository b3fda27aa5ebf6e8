"""The chat view against the API over a fake node whose answers each test scripts, streamed over real HTTP: answers
drawn as sanitised Markdown as they stream, thinking apart from the answer, conversations kept across reloads,
regenerate and edit of the last turn, and each answer's time to first token and tokens/s."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from itertools import count

from playwright.sync_api import Route, expect

from ringlet.shared.tasks import TextGenerationTask
from tests.support.dashboard import DashboardPage
from tests.support.fake_api import FakeServer
from tests.support.fake_node import FakeNode

ANSWER_TIMEOUT_MS = 20_000

MARKDOWN_ANSWER = (
    "Here is **bold** text and a list:\n\n- one\n- two\n\n"
    "```python\ndef add(a, b):\n    return a + b\n```\n\n"
    'Then <img src="http://example.invalid/x.png" onerror="window.pwned = 1"> and '
    '<script>window.pwned = 2</script>[a link](javascript:window.pwned=3), [the docs](https://example.invalid/docs) '
    'end.'
)

# Every change to the last answer's DOM, as the page drew it while the answer streamed.
WATCH_ANSWER_JS = """() => {
    window.answerFrames = [];
    const messages = document.querySelector('[data-testid=messages]');
    new MutationObserver(() => {
        const answers = messages.querySelectorAll('[data-testid=turn-assistant]');
        const last = answers[answers.length - 1];
        if (!last) return;
        const bubble = last.querySelector('[data-testid=answer]');
        window.answerFrames.push({
            text: bubble ? bubble.textContent : '',
            code: bubble ? bubble.querySelectorAll('pre code').length : 0,
            streaming: last.querySelector('.caret') !== null,
        });
    }).observe(messages, { subtree: true, childList: true, characterData: true });
}"""


def pieces(text: str, size: int = 4) -> Iterator[str]:
    """The text as small tokens (a fence's backticks split across them, as a tokenizer may)."""
    return (text[i:i + size] for i in range(0, len(text), size))


def sent(node: FakeNode) -> list[tuple[str, str]]:
    """The messages of the last chat request the node received: (role, content)."""
    task = node.submitted[-1]
    assert isinstance(task, TextGenerationTask) and task.messages is not None, task
    return [(m.role, m.content) for m in task.messages]


def ask(dashboard: DashboardPage[FakeServer], question: str) -> None:
    page = dashboard.page
    page.get_by_test_id("chat-input").fill(question)
    page.get_by_test_id("chat-send").click()
    expect(page.get_by_test_id("turn-assistant").last.get_by_test_id("turn-stats")).to_be_visible(
        timeout=ANSWER_TIMEOUT_MS)


def open_chat(dashboard: DashboardPage[FakeServer]) -> None:
    dashboard.open("chat")
    expect(dashboard.page.get_by_test_id("chat-input")).to_be_enabled()


def test_answers_render_as_sanitised_markdown_while_they_stream(scripted_dashboard: DashboardPage[FakeServer],
                                                               node: FakeNode) -> None:
    node.script = lambda: pieces(MARKDOWN_ANSWER)
    node.token_delay_s = 0.01
    page = scripted_dashboard.page
    open_chat(scripted_dashboard)
    page.evaluate(WATCH_ANSWER_JS)
    ask(scripted_dashboard, "Show me some Markdown")

    answer = page.get_by_test_id("turn-assistant").last.get_by_test_id("answer")
    expect(answer.locator("strong")).to_have_text("bold")
    expect(answer.locator("li")).to_have_text(["one", "two"])
    code = answer.locator("pre code")
    expect(code).to_have_class(re.compile(r"\bhljs\b.*language-python"))
    expect(code.locator(".hljs-keyword").first).to_have_text("def")
    expect(code).to_contain_text("return a + b")
    # what the model wrote as HTML does not become elements: no image (no request off the node), no script
    expect(answer.locator("img, script")).to_have_count(0)
    hrefs = answer.locator("a").evaluate_all("anchors => anchors.map(a => a.getAttribute('href'))")
    assert not any((href or "").startswith("javascript:") for href in hrefs), hrefs
    docs = answer.get_by_role("link", name="the docs")
    expect(docs).to_have_attribute("href", "https://example.invalid/docs")
    expect(docs).to_have_attribute("target", "_blank")
    expect(docs).to_have_attribute("rel", "noopener noreferrer")
    assert page.evaluate("window.pwned") is None
    expect(answer).to_contain_text("end.")

    frames = page.evaluate("window.answerFrames")
    # streaming-safe: the code block shows as code while the fence is still open, and no raw fence ever shows
    assert any(f["streaming"] and f["code"] == 1 and "return" in f["text"] for f in frames), frames[-5:]
    assert not any("```" in f["text"] for f in frames), [f["text"] for f in frames if "```" in f["text"]][:1]
    assert len({f["text"] for f in frames if f["streaming"]}) >= 10, "the answer did not arrive as a stream"
    scripted_dashboard.screenshot("chat-markdown")
    scripted_dashboard.watch.assert_clean()


def test_inline_think_tags_show_apart_and_stay_out_of_the_next_request(
        scripted_dashboard: DashboardPage[FakeServer], node: FakeNode) -> None:
    node.script = lambda: ["<think>", "The", " user", " greets", " me.", "</think>", "\n\n", "Hello", " there", "!"]
    node.token_delay_s = 0.01
    page = scripted_dashboard.page
    open_chat(scripted_dashboard)
    ask(scripted_dashboard, "Hi")

    turn = page.get_by_test_id("turn-assistant").last
    thinking = turn.get_by_test_id("thinking")
    expect(turn.get_by_test_id("answer")).to_have_text("Hello there!")
    expect(thinking.locator(".thinking-body")).not_to_be_visible()  # folded once the answer came
    thinking.locator("summary").click()
    expect(thinking.locator(".thinking-body")).to_have_text("The user greets me.")

    node.script = lambda: ["Fine", "."]
    ask(scripted_dashboard, "And?")
    assert sent(node) == [("user", "Hi"), ("assistant", "Hello there!"), ("user", "And?")]
    scripted_dashboard.watch.assert_clean()


def _chunk(delta: dict[str, str], finish: str | None = None) -> str:
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "SmolLM2-135M-Instruct",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


def test_reasoning_content_deltas_show_as_thinking(scripted_dashboard: DashboardPage[FakeServer]) -> None:
    """A server that parses thinking sends it as `reasoning_content` deltas (the OpenAI stream as vLLM and DeepSeek
    send it); the page shows them folded apart from the answer."""
    reasoning = ["Two", " plus", " two", " is", " four."]
    answer = ["It", " is", " **4**."]
    stream = ([_chunk({"role": "assistant", "reasoning_content": reasoning[0]})]
              + [_chunk({"reasoning_content": r}) for r in reasoning[1:]]
              + [_chunk({"content": a}) for a in answer] + [_chunk({}, "stop"), "data: [DONE]\n\n"])

    def reply(route: Route) -> None:
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body="".join(stream))

    page = scripted_dashboard.page
    page.route("**/v1/chat/completions", reply)
    open_chat(scripted_dashboard)
    ask(scripted_dashboard, "What is 2+2?")

    turn = page.get_by_test_id("turn-assistant").last
    expect(turn.get_by_test_id("answer")).to_have_text("It is 4.")
    expect(turn.get_by_test_id("answer").locator("strong")).to_have_text("4")
    thinking = turn.get_by_test_id("thinking")
    expect(thinking).to_contain_text("5 words")
    expect(thinking.locator(".thinking-body")).not_to_be_visible()
    thinking.locator("summary").click()
    expect(thinking.locator(".thinking-body")).to_have_text("Two plus two is four.")
    scripted_dashboard.screenshot("chat-thinking")
    scripted_dashboard.watch.assert_clean()


def test_conversations_survive_a_reload_and_can_be_switched_and_deleted(
        scripted_dashboard: DashboardPage[FakeServer], node: FakeNode) -> None:
    page = scripted_dashboard.page
    open_chat(scripted_dashboard)
    ask(scripted_dashboard, "What is the capital of France?")
    expect(page.get_by_test_id("turn-assistant").get_by_test_id("answer")).to_have_text("The capital of France is Paris.")

    page.reload()
    expect(page.get_by_test_id("connection")).to_contain_text("live")
    expect(page.get_by_test_id("question")).to_have_text("What is the capital of France?")
    expect(page.get_by_test_id("turn-assistant").get_by_test_id("answer")).to_have_text("The capital of France is Paris.")
    expect(page.get_by_test_id("turn-stats")).to_contain_text("tok/s")  # the answer's figures are kept too
    conversations = page.get_by_test_id("conversation")
    expect(conversations).to_have_count(1)
    expect(conversations).to_contain_text("What is the capital of France?")

    page.get_by_test_id("chat-new").click()
    expect(page.get_by_test_id("question")).to_have_count(0)
    node.script = lambda: ["Blue", "."]
    ask(scripted_dashboard, "What colour is the sky?")
    expect(conversations).to_have_count(2)
    # the new conversation starts empty: nothing of the first one was sent
    assert sent(node) == [("user", "What colour is the sky?")]

    conversations.filter(has_text="capital of France").get_by_role("button").first.click()
    expect(page.get_by_test_id("question")).to_have_text("What is the capital of France?")
    conversations.filter(has_text="colour is the sky").get_by_test_id("conversation-delete").click()
    expect(conversations).to_have_count(1)

    page.reload()
    expect(page.get_by_test_id("connection")).to_contain_text("live")
    expect(conversations).to_have_count(1)
    expect(page.get_by_test_id("question")).to_have_text("What is the capital of France?")
    scripted_dashboard.screenshot("chat-conversations")
    scripted_dashboard.watch.assert_clean()


def test_regenerate_the_last_answer_and_edit_the_last_question(scripted_dashboard: DashboardPage[FakeServer],
                                                              node: FakeNode) -> None:
    replies = count(1)
    node.script = lambda: [f"Answer {next(replies)}", "."]
    page = scripted_dashboard.page
    open_chat(scripted_dashboard)
    ask(scripted_dashboard, "First question")
    ask(scripted_dashboard, "Second question")
    answers = page.get_by_test_id("turn-assistant").get_by_test_id("answer")
    expect(answers).to_have_text(["Answer 1.", "Answer 2."])
    # only the last answer and the last question offer it
    expect(page.get_by_test_id("regenerate")).to_have_count(1)
    expect(page.get_by_test_id("edit-turn")).to_have_count(1)

    page.get_by_test_id("regenerate").click()
    expect(answers).to_have_text(["Answer 1.", "Answer 3."])
    assert sent(node) == [("user", "First question"), ("assistant", "Answer 1."), ("user", "Second question")]

    page.get_by_test_id("turn-user").last.get_by_test_id("edit-turn").click()
    page.get_by_test_id("edit-input").fill("Second question, edited")
    page.get_by_test_id("edit-send").click()
    expect(answers).to_have_text(["Answer 1.", "Answer 4."])
    expect(page.get_by_test_id("question")).to_have_text(["First question", "Second question, edited"])
    assert sent(node) == [("user", "First question"), ("assistant", "Answer 1."), ("user", "Second question, edited")]

    page.reload()  # the edited conversation is the one kept
    expect(page.get_by_test_id("question")).to_have_text(["First question", "Second question, edited"])
    expect(answers).to_have_text(["Answer 1.", "Answer 4."])
    scripted_dashboard.watch.assert_clean()


def _seconds(text: str) -> float:
    match = re.search(r"first token (\d+(?:\.\d+)?) (ms|s)", text)
    assert match, f"no time to first token in {text!r}"
    return float(match[1]) / (1000 if match[2] == "ms" else 1)


def _rate(text: str) -> float:
    match = re.search(r"(\d+(?:\.\d+)?) tok/s", text)
    assert match, f"no tokens/s in {text!r}"
    return float(match[1])


def test_each_answer_shows_its_own_time_to_first_token_and_tokens_per_second(
        scripted_dashboard: DashboardPage[FakeServer], node: FakeNode) -> None:
    page = scripted_dashboard.page
    open_chat(scripted_dashboard)
    node.script = lambda: ["word"] * 10
    node.token_delay_s = 0.1  # about 10 tokens/s, the first token after 0.1 s
    ask(scripted_dashboard, "Slowly")
    node.token_delay_s = 0.02  # about 50 tokens/s
    ask(scripted_dashboard, "Quickly")

    slow, fast = (page.get_by_test_id("turn-assistant").nth(i).get_by_test_id("turn-stats") for i in (0, 1))
    slow_text, fast_text = slow.inner_text(), fast.inner_text()
    assert _seconds(slow.get_by_test_id("turn-ttft").inner_text()) >= 0.09, slow_text
    assert 4 <= _rate(slow.get_by_test_id("turn-tps").inner_text()) <= 12, slow_text
    slow_rate, fast_rate = (_rate(t.get_by_test_id("turn-tps").inner_text()) for t in (slow, fast))
    assert fast_rate > 2 * slow_rate, (slow_text, fast_text)
    # the node's usage, not a count of chunks: the ten words and the end-of-sequence token the fake node counts
    assert "11 tokens" in slow_text, slow_text
    # the node's own figures for the same answer, beside the browser's
    assert 4 <= _rate(slow.get_by_test_id("turn-node-stats").inner_text()) <= 12, slow_text
    expect(page.get_by_test_id("tokens-per-s")).to_have_text(re.compile(r"^\d+(\.\d)?$"))
    scripted_dashboard.screenshot("chat-figures")
    scripted_dashboard.watch.assert_clean()
