"""What serving through an endpoint costs: `lmops serve --endpoint` against `lmops serve --model` on the
same weights, side by side in one run.

  python benchmarks/endpoint_overhead.py [--rounds 5] [--requests-per-client 4] [--max-tokens 128]

The model, prompts and clients are benchmarks/serve_load.py's (a random 4 x 256 model, vocab 2048 BPE;
aiohttp streaming clients, ignore_eos, temperature 0.8). Three servers in their own processes, each with
auth, moderation, the request log and metrics on, as `lmops serve` runs:

- model:    `--model FOLDER`, no endpoint;
- endpoint: an endpoint of one deployment of the same folder (routing by weight, the revision polled
  every serve.endpoint_poll_s, the deployment and version named in headers and the request log);
- mirror:   an endpoint of two deployments with 20% of the traffic mirrored to the second, so every
  answer is also scored and a fifth of them generated again by the shadow (what scored shadow traffic
  costs on the same 2 cores: the work is real, the target is only for routing).

8 clients, rounds alternating between the servers (this machine's speed drifts); each round's mean
end-to-end latency is compared with the model server's of the same round, and the median of those ratios
reported (each round's sides run a moment apart,
in the order ABC CBA ABC ..., so the drift cancels). Target: endpoint within 2% of model. After each side's
turn the next waits until that server is idle (no request running or waiting, no shadow job pending):
the mirror's scoring, left running, would otherwise land on whichever side comes next. Also reported: a
distribution-free 95% interval of each median ratio (binomial order statistics), each server's CPU time
per request from /proc (its shadow work after the clients finished included), and routing_cost()
in this process without and with a mirror (the draw, the shadow Job and Shadow.offer per answer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import serve_load  # noqa: E402
from serve_load import HOST, build, load  # noqa: E402

CLIENTS = 8


def serve(folder: Path, port: int, mode: str) -> None:
    import uvicorn

    from lmops.config import override
    from lmops.serve.app import create_app
    from lmops.serve.source import ModelSource
    from lmops.store import Store
    from lmops.workspace import Workspace

    ws = Workspace(folder / "ws")
    cfg = override(ws.config(), ["serve.max_batch=32", "serve.max_waiting=256", "auth.rate_limit_per_s=10000",
                                 "auth.burst=10000", "serve.metrics_public=true"])
    store = Store.for_workspace(ws, cfg)
    journal = ws.state / "request-journal" / str(port)
    if mode == "model":
        app = create_app(cfg, ModelSource(ws, cfg, str(folder / "model")), store, journal_dir=journal)
    else:
        app = create_app(cfg, None, store, journal_dir=journal, endpoint=mode, ws=ws)
    app.state.server.router.preload()
    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False)


def endpoints(folder: Path) -> None:
    from lmops.deploy.models import resolve_deployment
    from lmops.store import Store
    from lmops.workspace import Workspace

    ws = Workspace(folder / "ws")
    cfg = ws.config()
    with Store.for_workspace(ws, cfg) as store:
        for name, deployments in (("endpoint", ["blue"]), ("mirror", ["blue", "green"])):
            store.endpoints.create(name, "bench")
            for d in deployments:
                store.endpoints.deploy(resolve_deployment(ws, cfg, name, d, str(folder / "model")), "bench")
        store.endpoints.set_traffic("mirror", "bench", mirror={"green": 20})


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux's /proc; 0 elsewhere, where only metrics count)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle(url: str, pid: int, timeout: float = 300.0) -> float:
    """Wait until the server has no request running or waiting, no shadow job pending, and its process uses
    under 5% of a core over 0.2 s (the store writes after a job); the seconds waited."""
    started = time.monotonic()
    busy = ("lmops:num_requests_running", "lmops:num_requests_waiting", "lmops:shadow_jobs_pending")
    while time.monotonic() - started < timeout:
        resp = httpx.get(f"{url}/metrics")
        resp.raise_for_status()
        values = [float(ln.split()[-1]) for ln in resp.text.splitlines() if ln.startswith(busy)]
        if not any(values):
            before = cpu_seconds(pid)
            time.sleep(0.2)
            if cpu_seconds(pid) - before < 0.01:
                return time.monotonic() - started
        time.sleep(0.1)
    raise TimeoutError(f"{url} still busy after {timeout:.0f} s")


class Server(serve_load.Server):
    def __init__(self, folder: Path, mode: str):
        self.start([__file__, "--serve", str(folder), "{port}", mode])


def routing_cost(calls: int = 200_000, mirror: dict[str, int] | None = None) -> float:
    """Microseconds per request of what an endpoint adds in the request path, in this process: the weighted
    pick, the mirror draw and the two response headers (the store is read by a poller, not per request).
    With `mirror` (e.g. {"green": 20}), also what app.to_shadow does per answer: the shadow check, the
    Job built from the answer (a 16-token prompt, 128 tokens answered) and Shadow.offer; the job is taken
    off the queue again so that every offer is the accepted one (the get adds its own small cost)."""
    from lmops.config import Config
    from lmops.deploy.endpoints import Endpoint
    from lmops.serve.app import served_headers
    from lmops.serve.engine import SamplingParams
    from lmops.serve.router import Backend, Router
    from lmops.serve.shadow import Job, Shadow
    from lmops.store import utcnow

    router = Router(Config(), "bench")
    router.endpoint = "bench"
    for name in ("blue", "green"):
        router.backends[name] = Backend(name, None, served=object())
    traffic = {"blue": 100, "green": 0} if mirror else {"blue": 90, "green": 10}
    router.apply(Endpoint("bench", traffic=traffic, mirror=dict(mirror or {}), revision=1))
    shadow = Shadow(router, None, Config())
    row = {"deployment": "blue", "model_version": "1", "request_id": "chatcmpl-0123456789abcdef"}
    ids, prompt, params = list(range(144)), list(range(16)), SamplingParams()
    started = time.perf_counter()
    for _ in range(calls):
        b = router.pick(None)
        targets = router.mirror_targets(b.name)
        served_headers(row)
        if mirror and shadow.comparing:
            live = router.backends.get(row["deployment"])
            shadow.offer(Job(utcnow(), row["request_id"], live, list(prompt), ids[len(prompt):], params, "length",
                             False, 0.05, 0.4, targets))
            shadow.queue.get_nowait()
    return (time.perf_counter() - started) / calls * 1e6


def median_ci(xs: list[float]) -> tuple[float, float]:
    """A distribution-free 95% interval for the median: the order statistics whose ranks a Binomial(n, 1/2)
    puts 2.5% below and above (n >= 6)."""
    from math import comb

    xs, n = sorted(xs), len(xs)
    cdf, lo = 0.0, 0
    for k in range(n + 1):
        cdf += comb(n, k) / 2 ** n
        if cdf > 0.025:
            lo = k
            break
    lo = max(lo - 1, 0)
    return xs[lo], xs[n - 1 - lo]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--modes", default="model,endpoint,mirror", help="the servers to compare, in this order")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(folder)
        endpoints(folder)
        key, prompts = (folder / "key").read_text(), json.loads((folder / "prompts.json").read_text())
        servers = {mode: Server(folder, mode) for mode in args.modes.split(",")}
        try:
            means: dict[str, list[float]] = {m: [] for m in servers}
            waited: dict[str, list[float]] = {m: [] for m in servers}
            cpu_ms: dict[str, list[float]] = {m: [] for m in servers}
            print(f"{CLIENTS} streaming clients x {args.requests_per_client} requests, {args.max_tokens} tokens each, "
                  f"{args.rounds} rounds alternating")
            for i in range(args.rounds):
                # ABC CBA ...: a drift of the machine's speed within a round pair lands on every side alike
                for mode, server in list(servers.items())[::1 if i % 2 == 0 else -1]:
                    cpu = cpu_seconds(server.proc.pid)
                    results, _ = asyncio.run(load(server.url, key, prompts, CLIENTS, args.requests_per_client,
                                                  args.max_tokens))
                    means[mode].append(statistics.fmean(r.latency for r in results) * 1000)
                    waited[mode].append(idle(server.url, server.proc.pid))
                    # the server's CPU for the side's requests, its shadow work after them included
                    cpu_ms[mode].append((cpu_seconds(server.proc.pid) - cpu) * 1000 / len(results))
                print(f"round {i + 1}/{args.rounds} done", file=sys.stderr, flush=True)
            dropped = httpx.get(f"{servers['mirror'].url}/metrics") \
                if "mirror" in servers else None
        finally:
            for s in servers.values():
                s.close()
    for mode, xs in means.items():
        print(f"mean E2EL per round (ms), {mode:8s}: {' '.join(f'{x:.1f}' for x in xs)}  "
              f"(then idle after {statistics.fmean(waited[mode]):.1f} s on average)")
    for mode in [m for m in ("endpoint", "mirror") if m in means]:
        # each round's pair measured a moment apart: the ratio cancels the drift between rounds
        ratios = sorted(100 * (a / b - 1) for a, b in zip(means[mode], means["model"]))
        q1, med, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        lo, hi = median_ci(ratios) if len(ratios) >= 6 else (None, None)
        ci = f" 95% CI of the median {lo:+.1f}% .. {hi:+.1f}%," if lo is not None else ""
        target = " (target < +2%)" if mode == "endpoint" else " (shadow work within serve.shadow_busy_share)"
        print(f"{mode} vs model, per-round ratio of mean E2EL: median {med:+.1f}% (quartiles {q1:+.1f}% "
              f"{q3:+.1f}%,{ci} {len(ratios)} rounds){target}")
    for mode, xs in cpu_ms.items():
        q1, med, q3 = statistics.quantiles(xs, n=4) if len(xs) > 1 else (xs[0],) * 3
        print(f"server CPU per request (ms), {mode:8s}: median {med:.1f} (quartiles {q1:.1f} {q3:.1f})")
    model_ms = statistics.median(means["model"])
    for label, mirror in (("routing", None), ("routing + mirror {'green': 20}, Job, Shadow.offer", {"green": 20})):
        us = routing_cost(mirror=mirror)
        print(f"{label} in the request path: {us:.1f} us per request, {100 * us / 1000 / model_ms:.4f}% "
              "of the model server's median round mean")
    if dropped is not None and dropped.status_code == 200:
        lines = [ln for ln in dropped.text.splitlines() if ln.startswith("lmops:shadow_jobs_total")]
        print("shadow jobs:", ", ".join(lines) or "none counted")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        main()
