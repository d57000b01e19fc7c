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

8 clients, rounds alternating between the servers (this machine's speed drifts); the medians of each
round's mean end-to-end latency are compared. Target: endpoint within 2% of model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
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
                                 "auth.burst=10000"])
    store = Store.for_workspace(ws, cfg)
    journal = ws.state / "request-journal" / str(port)
    if mode == "model":
        app = create_app(cfg, ModelSource(ws, cfg, str(folder / "model")), store, journal_dir=journal)
    else:
        app = create_app(cfg, None, store, journal_dir=journal, endpoint=mode, ws=ws)
    app.state.server.preload()
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


class Server(serve_load.Server):
    def __init__(self, folder: Path, mode: str):
        self.start([__file__, "--serve", str(folder), "{port}", mode])

    def close(self) -> None:
        self.__exit__()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(folder)
        endpoints(folder)
        key, prompts = (folder / "key").read_text(), json.loads((folder / "prompts.json").read_text())
        servers = {mode: Server(folder, mode) for mode in ("model", "endpoint", "mirror")}
        try:
            means: dict[str, list[float]] = {m: [] for m in servers}
            print(f"{CLIENTS} streaming clients x {args.requests_per_client} requests, {args.max_tokens} tokens each, "
                  f"{args.rounds} rounds alternating")
            for _ in range(args.rounds):
                for mode, server in servers.items():
                    results, _ = asyncio.run(load(server.url, key, prompts, CLIENTS, args.requests_per_client,
                                                  args.max_tokens))
                    means[mode].append(statistics.fmean(r.latency for r in results) * 1000)
            dropped = httpx.get(f"{servers['mirror'].url}/metrics", headers={"Authorization": f"Bearer {key}"})
        finally:
            for s in servers.values():
                s.close()
    for mode, xs in means.items():
        print(f"mean E2EL per round (ms), {mode:8s}: {' '.join(f'{x:.1f}' for x in xs)}")
    base = statistics.median(means["model"])
    for mode in ("endpoint", "mirror"):
        m = statistics.median(means[mode])
        target = " (target < +2%)" if mode == "endpoint" else " (scoring every answer, 20% generated twice)"
        print(f"median of round means: {mode} {m:.1f} ms vs model {base:.1f} ms: {100 * (m / base - 1):+.1f}%{target}")
    if dropped.status_code == 200:
        lines = [ln for ln in dropped.text.splitlines() if ln.startswith("lmops:shadow_jobs_total")]
        print("shadow jobs:", ", ".join(lines) or "none counted")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        main()
