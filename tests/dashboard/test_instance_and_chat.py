"""From an empty node to a streamed answer, only through the page: launch a CpuRing instance of the embedded
model, watch it load, chat with it, stop an answer mid-stream, delete the instance."""

from __future__ import annotations

import re
import time

import pytest
from playwright.sync_api import expect

from tests.support.dashboard import DashboardPage

LOAD_TIMEOUT_MS = 240_000
ANSWER_TIMEOUT_MS = 120_000

# Records the length of the last answer's text at every DOM change, to tell a stream from one late update.
WATCH_ANSWER_JS = """() => {
    window.answerLengths = [];
    const messages = document.querySelector('[data-testid=messages]');
    new MutationObserver(() => {
        const bubbles = messages.querySelectorAll('[data-testid=turn-assistant] .bubble');
        const last = bubbles[bubbles.length - 1];
        if (last) window.answerLengths.push(last.textContent.trim().length);
    }).observe(messages, { subtree: true, childList: true, characterData: true });
}"""


def _wait_until_no_tasks(dashboard: DashboardPage, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while dashboard.node.json("/state")["tasks"]:
        assert time.monotonic() < deadline, "the stopped request still holds the instance"
        time.sleep(0.1)


@pytest.mark.slow
def test_create_cpu_ring_instance_then_chat_streams_text(dashboard: DashboardPage) -> None:
    page = dashboard.page
    dashboard.open("instances")
    expect(page.get_by_test_id("model-select")).to_have_value("SmolLM2-135M-Instruct")
    page.get_by_test_id("instance-type-CpuRing").click()
    stage = page.get_by_test_id("placement-stage")
    expect(stage).to_have_count(1)
    expect(stage).to_contain_text(dashboard.node.name)
    expect(stage).to_contain_text("0–29")
    dashboard.screenshot("instances-preview")

    page.get_by_test_id("launch").click()
    card = page.get_by_test_id("instance-card")
    expect(card).to_have_count(1)
    expect(card.get_by_test_id("instance-status")).to_have_text(re.compile("loading|ready"))
    expect(card).to_have_attribute("data-status", "ready", timeout=LOAD_TIMEOUT_MS)
    assert [r["instance"]["instance_type"] for r in dashboard.node.json("/state")["instances"].values()] == ["CpuRing"]
    dashboard.screenshot("instances")

    card.get_by_role("button", name="Chat").click()
    expect(page).to_have_url(re.compile("#chat$"))
    expect(page.get_by_test_id("chat-instance")).to_contain_text("SmolLM2-135M-Instruct")
    page.locator("input[type=range]").fill("0")  # greedy: the embedded model answers this one right
    page.evaluate(WATCH_ANSWER_JS)
    page.get_by_test_id("chat-input").fill("What is the capital of France?")
    page.get_by_test_id("chat-send").click()

    expect(page.get_by_test_id("chat-stop")).to_be_visible()
    answer = page.get_by_test_id("turn-assistant").last
    expect(answer.get_by_test_id("turn-stats")).to_be_visible(timeout=ANSWER_TIMEOUT_MS)
    expect(answer.locator(".bubble")).to_contain_text("Paris")
    lengths = page.evaluate("window.answerLengths")
    growth = sorted({n for n in lengths if n > 0})
    assert len(growth) >= 3, f"the answer appeared in {len(growth)} step(s), not as a stream: {lengths}"
    assert page.get_by_test_id("ttft").inner_text() != "—"
    assert re.fullmatch(r"\d+(\.\d)?", page.get_by_test_id("tokens-per-s").inner_text())
    expect(answer.get_by_test_id("turn-stats")).to_contain_text("stop")
    dashboard.screenshot("chat")

    # Stop mid-answer: the fetch is aborted, the node ends the task, and the instance answers the next one
    page.get_by_test_id("chat-input").fill("Write a long story about a dragon who learns to cook.")
    page.get_by_test_id("chat-send").click()
    story = page.get_by_test_id("turn-assistant").last
    expect(story.locator(".bubble")).to_have_text(re.compile(r"\w+\W+\w+\W+\w+"), timeout=ANSWER_TIMEOUT_MS)
    page.get_by_test_id("chat-stop").click()
    expect(story.get_by_test_id("turn-stats")).to_contain_text("stopped")
    expect(page.get_by_test_id("chat-send")).to_be_visible()
    _wait_until_no_tasks(dashboard, timeout_s=5)

    dashboard.show("instances")
    card.get_by_test_id("delete-instance").click()
    expect(card.get_by_test_id("delete-instance")).to_have_text("Confirm delete")
    card.get_by_test_id("delete-instance").click()
    expect(page.get_by_test_id("instance-card")).to_have_count(0)
    assert dashboard.node.json("/state")["instances"] == {}
    dashboard.watch.assert_clean()


@pytest.mark.slow
def test_a_model_that_cannot_be_downloaded_fails_with_the_runners_reason(dashboard: DashboardPage) -> None:
    missing = next(m["card"]["id"] for m in dashboard.node.json("/models")["models"]
                   if not m["on_disk"] and any(f["possible"] for f in m["fits"] if f["instance_type"] == "CpuRing"))
    page = dashboard.page
    dashboard.open("instances")
    page.get_by_test_id("model-select").select_option(missing)
    expect(page.get_by_test_id("not-downloaded")).to_contain_text(f"ringlet pull {missing}")
    page.get_by_test_id("instance-type-CpuRing").click()
    expect(page.get_by_test_id("placement-stage")).to_have_count(1)
    page.get_by_test_id("launch").click()

    card = page.locator(f"[data-testid=instance-card]:has-text('{missing}')")
    expect(card).to_have_attribute("data-status", "failed", timeout=LOAD_TIMEOUT_MS)
    # the test node is offline: its runner cannot fetch the files, and says so
    expect(card.get_by_test_id("instance-error")).to_contain_text(f"offline: {missing} is not on disk")
    dashboard.screenshot("instances-failed")
    card.get_by_test_id("delete-instance").click()
    card.get_by_test_id("delete-instance").click()
    expect(card).to_have_count(0)
    dashboard.watch.assert_clean()
