"""What monitoring costs a server's answers: median request latency at 8 clients with a monitor run going
on beside it, against none, side by side in one run.

  python benchmarks/monitor_overhead.py [--rounds 8] [--requests-per-client 24] [--max-tokens 128]

The model, prompts and clients are benchmarks/serve_load.py's (a random 4 x 256 model, vocab 2048 BPE;
aiohttp streaming clients). One server process serving an endpoint of one deployment, with auth,
moderation, the request log and metrics on (and its drift gauges, refreshed from the store every 15 s),
monitor.interval_s 0 so that only this script starts runs. Rounds alternate:

- off: the server alone;
- on:  the server with `lmops monitor watch` beside it running monitor runs back to back for the whole
  round, started exactly as the server starts its scheduled runs (lmops/serve/monitoring.py: nice 19,
  one thread), over the window the rounds have filled; the clients start once its first run is done
  (imports paid). Back to back is the worst case: the server's default schedule is one run per 15
  minutes, a few seconds each. Niced, a run gets the CPU the server leaves: the runs completed during
  the rounds are counted, so a cost kept low by starving the monitor shows.

Each round's median end-to-end latency; the per-round-pair ratio on / off, median over rounds (the
machine's speed drifts, the pairs cancel it). Target: at most +2%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import serve_load  # noqa: E402
from serve_load import build, load  # noqa: E402

CLIENTS = 8
ENDPOINT = "chat"


def serve(folder: Path, port: int) -> None:
    import uvicorn

    from lmops.config import override
    from lmops.serve.app import create_app
    from lmops.store import Store
    from lmops.workspace import Workspace

    ws = Workspace(folder / "ws")
    cfg = override(ws.config(), ["serve.max_batch=32", "serve.max_waiting=256", "auth.rate_limit_per_s=10000",
                                 "auth.burst=10000", "serve.metrics_public=true", "monitor.interval_s=0"])
    store = Store.for_workspace(ws, cfg)
    app = create_app(cfg, None, store, journal_dir=ws.state / "request-journal" / str(port), endpoint=ENDPOINT, ws=ws)
    app.state.server.router.preload()
    uvicorn.run(app, host=serve_load.HOST, port=port, log_level="warning", access_log=False)


def deploy(folder: Path) -> None:
    from lmops.deploy.models import resolve_deployment
    from lmops.store import Store
    from lmops.workspace import Workspace

    ws = Workspace(folder / "ws")
    cfg = ws.config()
    with Store.for_workspace(ws, cfg) as store:
        store.endpoints.create(ENDPOINT, "bench")
        store.endpoints.deploy(resolve_deployment(ws, cfg, ENDPOINT, "blue", str(folder / "model")), "bench")


class Server(serve_load.Server):
    def __init__(self, folder: Path):
        self.start([__file__, "--serve", str(folder), "{port}"])


def watcher(folder: Path, interval: str) -> subprocess.Popen:
    """Monitor runs back to back, started as the server starts its own (lmops/serve/monitoring.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmops", "monitor", "watch", "--endpoint", ENDPOINT, "--interval",
                             interval, "--window", "1h", "-w", str(folder / "ws")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.nice(19))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--interval", default="0.1s", help="between the watcher's runs: 0.1s is back to back (the "
                        "worst case); the server's default is 15m")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(folder)
        deploy(folder)
        key, prompts = (folder / "key").read_text(), json.loads((folder / "prompts.json").read_text())
        server = Server(folder)
        medians: dict[str, list[float]] = {"off": [], "on": []}
        runs = 0
        try:
            asyncio.run(load(server.url, key, prompts, CLIENTS, args.requests_per_client, args.max_tokens))  # warm-up
            print(f"{CLIENTS} streaming clients x {args.requests_per_client} requests, {args.max_tokens} tokens each, "
                  f"{args.rounds} round pairs alternating")
            for i in range(args.rounds):
                for side in (("off", "on") if i % 2 == 0 else ("on", "off")):
                    proc = watcher(folder, args.interval) if side == "on" else None
                    if proc is not None:  # its imports done and a first run made before the clients start
                        first = proc.stderr.readline()
                        assert first.startswith("run 1:"), first
                    results, _ = asyncio.run(load(server.url, key, prompts, CLIENTS, args.requests_per_client,
                                                  args.max_tokens))
                    medians[side].append(statistics.median(r.latency for r in results) * 1000)
                    if proc is not None:
                        proc.terminate()
                        _, out = proc.communicate(timeout=60)  # the CLI reports on stderr
                        runs += sum(1 for ln in out.splitlines() if ln.startswith("run "))  # during the round
        finally:
            server.close()
    for side, xs in medians.items():
        print(f"median E2EL per round (ms), monitoring {side:3s}: {' '.join(f'{x:.1f}' for x in xs)}")
    ratios = sorted(100 * (a / b - 1) for a, b in zip(medians["on"], medians["off"]))
    q1, med, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    print(f"monitoring on vs off, per-round ratio of median E2EL: median {med:+.1f}% (quartiles {q1:+.1f}% {q3:+.1f}%) "
          f"(target <= +2%); {runs} monitor runs completed during the 'on' rounds, one every {args.interval}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
