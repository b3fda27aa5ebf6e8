"""Chat requests against a live node: long streams that only a cancel ends, and short ones beside them."""

from __future__ import annotations

import asyncio

import httpx

LONG = 4000  # far more tokens than any test waits for: only a cancel ends such a generation early


def chat_body(model: str, max_tokens: int, stream: bool) -> dict[str, object]:
    return {"model": model, "max_tokens": max_tokens, "stream": stream, "temperature": 0.8, "seed": 1,
            "messages": [{"role": "user", "content": "Write a very long story about a dragon."}]}


async def join_a_running_stream(url: str, model: str) -> list[str]:
    """A long stream (the hog), then two short requests B and C while it streams: what finished, and "hog still
    streaming" where the hog was the only task left running once B and C were done."""
    finished: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def short(name: str) -> None:
            reply = await client.post("/v1/chat/completions", json=chat_body(model, 2, False))
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] == 2
            finished.append(name)

        async with client.stream("POST", "/v1/chat/completions", json=chat_body(model, LONG, True)) as hog:
            lines = hog.aiter_lines()
            await anext(lines)  # the hog is generating
            await asyncio.wait_for(asyncio.gather(short("B"), short("C")), 60)
            tasks = (await client.get("/state")).json()["tasks"].values()
            assert [t["status"] for t in tasks] == ["running"], "the hog still streams"
            finished.append("hog still streaming")
    return finished
