"""`ringlet chat`: an interactive chat with a model served by a running node, streaming each reply."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ringlet.cli import CliError

HELP = "/reset forgets the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops a reply"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model served by a running node",
                       description=f"Chat with a model served by a running node (`ringlet node`). {HELP}.")
    p.add_argument("--url", default="http://localhost:52415", help="the node's API (default http://localhost:52415)")
    p.add_argument("--model", default=None, help="model id (default: the first model with a ready instance)")
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens per reply (default 512)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default 0.7)")
    p.set_defaults(func=run)


def ready_model(client: Any) -> str | None:
    """The first model with a ready instance on the node, if any."""
    return next((m["id"] for m in client.get("/v1/models")["data"] if m.get("ready")), None)


def pick_model(client: Any) -> str:
    """The first model with a ready instance on the node."""
    if (model := ready_model(client)) is None:
        raise CliError("no model has a ready instance on this node; wait for it to load (`ringlet ps`), or create "
                       "one from the dashboard")
    return model


def _reply(client: Any, body: dict[str, Any]) -> str:
    """Stream the reply to stdout and return its answer; a thinking model's thinking shows first (dimmed on a
    terminal) and stays out of the answer kept in the conversation."""
    parts: list[str] = []
    dim, plain = ("\x1b[2m", "\x1b[0m") if sys.stdout.isatty() else ("", "")
    thinking = False
    try:
        for event in client.stream_events("/v1/chat/completions", body):
            for choice in event.get("choices", []):
                delta = choice.get("delta", {})
                thought, text = delta.get("reasoning_content") or "", delta.get("content") or ""
                if thought:
                    sys.stdout.write((dim if not thinking else "") + thought)
                    thinking = True
                if text and thinking:
                    sys.stdout.write(plain + "\n\n")
                    thinking = False
                parts.append(text)
                sys.stdout.write(text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write(" [stopped]")  # leaving the stream closes the connection: the node stops generating
    sys.stdout.write((plain if thinking else "") + "\n")
    return "".join(parts)


def run(args: argparse.Namespace) -> int:
    from ringlet.cli.client import NodeApiError, NodeClient

    client = NodeClient(args.url)
    interactive = sys.stdin.isatty()
    try:
        model = args.model or pick_model(client)
    except NodeApiError as error:
        raise CliError(str(error)) from None
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    if interactive:
        print(f"chatting with {model} at {args.url}; {HELP}")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print()
            return 130
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": text})
        body = {"model": model, "messages": history, "stream": True, "max_tokens": args.max_tokens,
                "temperature": args.temperature}
        try:
            answer = _reply(client, body)
        except NodeApiError as error:
            history.pop()
            if not interactive:
                raise CliError(str(error)) from None
            print(f"error: {error}", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": answer})
