"""`ringlet embed`: the embeddings of texts by an embedding model served by a running node, one JSON array a line."""

from __future__ import annotations

import argparse
import json
import sys

from ringlet.cli import CliError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed texts with an embedding model served by a running node",
                       description="Print the embedding of each text (the arguments, else each line of stdin) by an "
                                   "embedding model served by a running node (`ringlet node --model "
                                   "Qwen/Qwen3-Embedding-0.6B`): one JSON array of floats a line, in order.")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (none: each non-empty line of stdin)")
    p.add_argument("--url", default="http://localhost:52415", help="the node's API (default http://localhost:52415)")
    p.add_argument("--model", default=None, help="model id (default: the first model with a ready instance)")
    p.add_argument("--dimensions", type=int, default=None,
                   help="keep the first this many values of each embedding (normalised again where the model "
                        "normalises)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ringlet.cli.chat import pick_model
    from ringlet.cli.client import NodeApiError, NodeClient

    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise CliError("no text to embed: give texts as arguments or lines on stdin")
    client = NodeClient(args.url)
    try:
        model = args.model or pick_model(client)
        body: dict[str, object] = {"model": model, "input": texts, "encoding_format": "float"}
        if args.dimensions is not None:
            body["dimensions"] = args.dimensions
        answer = client.get_json("/v1/embeddings", body)
    except NodeApiError as error:
        raise CliError(str(error)) from None
    for item in sorted(answer["data"], key=lambda d: d["index"]):
        print(json.dumps(item["embedding"]))
    return 0
