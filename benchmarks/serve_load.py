"""Load on the OpenAI-compatible server over loopback, reported as `vllm bench serve` reports it.

  python benchmarks/serve_load.py [--requests-per-client 3] [--max-tokens 128] [--batch-rounds 3] [--rounds 5]
                                  [--runtime auto|onnxruntime|torch]

The server runs in its own process (as `lmops serve` would), on 127.0.0.1, serving a random 4 layers x
256 model (vocab 2048 byte-level BPE trained on the demo corpus, context 512); the clients run here, as
raw streaming HTTP (aiohttp, as `vllm bench serve`: the clients share the server's 2 cores, and httpx
spent 2.5x more CPU per streamed token), each sending its requests one after another. Every request asks for exactly
--max-tokens tokens (`ignore_eos`, as vLLM's benchmark does), sampling at temperature 0.8, with one of 32
fixed prompts of 40-60 tokens, and stream_options.include_usage for the token count.

1. Continuous batching: 32 concurrent clients against the server with max_batch=32, then the same
   server with max_batch=1 (batching off), alternating for --batch-rounds rounds (this machine's speed
   drifts). Output tokens/s per round and their medians; TTFT, TPOT, ITL and end-to-end latency (mean,
   median, p99 over all rounds' requests) as vLLM defines them: TTFT from sending the request to the
   first chunk with text; TPOT = (latency - TTFT) / (output tokens - 1); ITL the gaps between chunks.
2. The cost of auth + moderation + request log + metrics: 8 clients against a server with them on and one
   with them off (same batching), alternating for --rounds rounds (this machine's speed drifts), medians
   of each round's mean end-to-end latency compared (target: on costs < 5%).

Streaming with moderation on holds back the last serve.moderation_holdback_chars characters of a
completion until what follows them is known (lmops/serve/output.py), which shows in TTFT, not in latency.
With the features on, the request log also writes its journal (fsync'd before a response ends), as
`lmops serve` does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

HOST = "127.0.0.1"
CLIENTS_BATCHING = 32
CLIENTS_OVERHEAD = 8
REQUEST_TIMEOUT_S = 120  # bounds every request: a stuck server fails the benchmark instead of hanging it


# ----------------------------------------------------------------------------- the server, in its own process

def build(folder: Path) -> None:
    """The served model (random weights, real tokenizer) and a workspace with an API key."""
    import torch

    from lmops.checkpoint import save_checkpoint
    from lmops.data.demo import demo_corpus
    from lmops.model import GPT, GPTConfig
    from lmops.store import Store
    from lmops.tokenizer import save_tokenizer, train_tokenizer
    from lmops.workspace import init_workspace

    tok = train_tokenizer([demo_corpus()], "bpe", vocab_size=2048)
    cfg = GPTConfig(vocab_size=tok.get_vocab_size(), n_layer=4, n_head=4, n_kv_head=4, d_model=256, mlp_hidden=704,
                    block_size=512, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():  # wider than the 0.02 init, so sampled tokens vary rather than repeat
        model.embed.weight.normal_(0, 1.0)
    save_tokenizer(tok, folder / "model")
    save_checkpoint(folder / "model" / "ckpt.safetensors", model)
    ws = init_workspace(folder / "ws")
    with Store.for_workspace(ws) as store:
        _, secret = store.keys.create("bench", "inference", "bench")
    (folder / "key").write_text(secret)
    text = demo_corpus()
    prompts, start = [], 0
    for i in range(32):  # 32 fixed prompts of 40-60 tokens, from spread-out places in the corpus
        ids = tok.encode(text[start:start + 2000]).ids[:40 + (i * 7) % 21]
        prompts.append(tok.decode(ids))
        start += len(text) // 40
    (folder / "prompts.json").write_text(json.dumps(prompts))


def serve(folder: Path, port: int, max_batch: int, features: bool, runtime: str) -> None:
    import uvicorn

    from lmops.config import override
    from lmops.serve.app import create_app
    from lmops.serve.source import ModelSource
    from lmops.store import Store
    from lmops.workspace import Workspace

    ws = Workspace(folder / "ws")
    cfg = override(ws.config(), [f"serve.max_batch={max_batch}", "serve.max_waiting=256",
                                 f"serve.runtime={runtime}", "auth.rate_limit_per_s=10000", "auth.burst=10000"])
    store = Store.for_workspace(ws, cfg)
    app = create_app(cfg, ModelSource(ws, cfg, str(folder / "model")), store, auth=features, moderation=features,
                     request_log=features, metrics=features,
                     journal_dir=ws.state / "request-journal" / str(port) if features else None)
    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False)


class Server:
    """A server process; stopped (SIGTERM) on exit."""

    def __init__(self, folder: Path, max_batch: int, features: bool, runtime: str = "auto"):
        self.start([__file__, "--serve", str(folder), "{port}", str(max_batch), "1" if features else "0", runtime])

    def start(self, argv: list[str]) -> None:
        """Run `python argv` ({port} replaced by a free port) and wait until /readyz answers 200."""
        import socket

        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = s.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        self.proc = subprocess.Popen([sys.executable, *(a.replace("{port}", str(self.port)) for a in argv)])
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.1)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


# ----------------------------------------------------------------------------- clients

@dataclass
class Result:
    ttft: float
    latency: float
    output_tokens: int
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float:
        return (self.latency - self.ttft) / max(1, self.output_tokens - 1)


async def one_request(http: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> Result:
    body = {"model": "model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "top_p": 0.95,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, last, itl, tokens = None, None, [], 0
    async with http.post(f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.content:  # one line at a time
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if event.get("choices") and event["choices"][0]["text"]:
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - start
                else:
                    itl.append(now - last)
                last = now
    latency = time.perf_counter() - start
    if tokens != max_tokens:
        raise RuntimeError(f"asked for {max_tokens} tokens, got {tokens}")
    return Result(ttft if ttft is not None else latency, latency, tokens, itl)


async def load(url: str, key: str, prompts: list[str], clients: int, per_client: int,
               max_tokens: int) -> tuple[list[Result], float]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"},
                                     connector=aiohttp.TCPConnector(limit=clients),
                                     timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as http:
        async def client(c: int) -> list[Result]:
            return [await one_request(http, url, prompts[(c * per_client + i) % len(prompts)], max_tokens)
                    for i in range(per_client)]

        await one_request(http, url, prompts[0], 8)  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*(client(c) for c in range(clients)))
        return [r for rs in results for r in rs], time.perf_counter() - start


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def report(name: str, results: list[Result], wall: float) -> dict:
    tokens = sum(r.output_tokens for r in results)
    stats = {"requests": len(results), "duration_s": wall, "output_tok_s": tokens / wall,
             "request_s": len(results) / wall}
    for metric, xs in (("ttft", [r.ttft for r in results]), ("tpot", [r.tpot for r in results]),
                       ("itl", [x for r in results for x in r.itl]), ("e2el", [r.latency for r in results])):
        stats[metric] = {"mean": statistics.fmean(xs) * 1000, "median": statistics.median(xs) * 1000,
                         "p99": pct(xs, 99) * 1000}
    print(f"\n--- {name} ---")
    print(f"{'requests':<28}{len(results):>10}")
    print(f"{'duration (s)':<28}{wall:>10.2f}")
    print(f"{'request throughput (req/s)':<28}{stats['request_s']:>10.2f}")
    print(f"{'output token throughput':<28}{stats['output_tok_s']:>10.1f}  tok/s")
    for metric, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2EL")):
        s = stats[metric]
        print(f"{label + ' (ms)':<28}mean {s['mean']:8.1f}  median {s['median']:8.1f}  p99 {s['p99']:8.1f}")
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch-rounds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runtime", default="auto", help="serve.runtime of every server (default auto: onnxruntime)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(folder)
        key, prompts = (folder / "key").read_text(), json.loads((folder / "prompts.json").read_text())

        def run(server: Server, clients: int, per_client: int) -> tuple[list[Result], float]:
            return asyncio.run(load(server.url, key, prompts, clients, per_client, args.max_tokens))

        print(f"1. continuous batching: {CLIENTS_BATCHING} streaming clients x {args.requests_per_client} requests, "
              f"{args.max_tokens} output tokens each, {args.batch_rounds} rounds alternating")
        with Server(folder, CLIENTS_BATCHING, True, args.runtime) as on:
            with Server(folder, 1, True, args.runtime) as single:
                pooled: dict[str, tuple[list[Result], float]] = {"batched": ([], 0.0), "single": ([], 0.0)}
                rates: dict[str, list[float]] = {"batched": [], "single": []}
                for _ in range(args.batch_rounds):
                    for label, server in (("batched", on), ("single", single)):
                        results, wall = run(server, CLIENTS_BATCHING, args.requests_per_client)
                        pooled[label] = (pooled[label][0] + results, pooled[label][1] + wall)
                        rates[label].append(sum(r.output_tokens for r in results) / wall)
            report(f"max_batch={CLIENTS_BATCHING}, all rounds", *pooled["batched"])
            report("max_batch=1 (batching off), all rounds", *pooled["single"])
            b, o = statistics.median(rates["batched"]), statistics.median(rates["single"])
            print(f"\noutput tok/s per round: batched {' '.join(f'{x:.0f}' for x in rates['batched'])}; "
                  f"max_batch=1 {' '.join(f'{x:.0f}' for x in rates['single'])}")
            print(f"batching: {b:.0f} vs {o:.0f} tok/s (medians), {b / o:.2f}x")

            print(f"\n2. auth + moderation + request log + metrics: {CLIENTS_OVERHEAD} clients, {args.rounds} rounds "
                  "alternating")
            with Server(folder, CLIENTS_BATCHING, False, args.runtime) as bare:
                means: dict[str, list[float]] = {"on": [], "off": []}
                ttfts: dict[str, list[float]] = {"on": [], "off": []}
                for _ in range(args.rounds):
                    for label, server in (("on", on), ("off", bare)):
                        results, _ = run(server, CLIENTS_OVERHEAD, 4)
                        means[label].append(statistics.fmean(r.latency for r in results) * 1000)
                        ttfts[label].append(statistics.median(r.ttft for r in results) * 1000)
        m_on, m_off = statistics.median(means["on"]), statistics.median(means["off"])
        print(f"mean E2EL per round (ms): on {' '.join(f'{x:.1f}' for x in means['on'])}; "
              f"off {' '.join(f'{x:.1f}' for x in means['off'])}")
        print(f"median of round means: on {m_on:.1f} ms, off {m_off:.1f} ms: {100 * (m_on / m_off - 1):+.1f}% "
              "(target < +5%)")
        print(f"median TTFT: on {statistics.median(ttfts['on']):.1f} ms, off {statistics.median(ttfts['off']):.1f} ms "
              "(on holds back the first serve.moderation_holdback_chars characters)")


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1", sys.argv[6])
    else:
        main()
