"""How long a broken canary keeps failing requests: from its first error a client sees to the moment the
traffic is back on the stable deployment, against the target of one analysis window plus one second.

  python benchmarks/rollback_time.py [--trials 3] [--window 5] [--clients 4]

The model, prompts and key are benchmarks/serve_load.py's. One server process serves an endpoint of two
deployments of it, blue (stable, all traffic) and green, whose forward raises (a model that errors), and
drives the endpoint's rollouts as `lmops serve --endpoint` does (the Driver in the process, woken back into
the server's router after each decision). Per trial: clients send short streaming-free requests without
pause, a canary of green starts (steps 50,100, rollout.window_s = --window, the default tick of 1 s), and
each answer's send and receive times and its x-lmops-deployment header are kept. Measured:

- first error: when the client received the first 5xx (the canary's first failed request);
- back on stable: when the last request answered by green (its header) was sent; every request sent
  after it went to blue;
- the difference, against --window + 1 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import serve_load  # noqa: E402
from serve_load import HOST, build  # noqa: E402


def serve(folder: Path, port: int, window: float) -> None:
    import uvicorn

    from lmops.config import override
    from lmops.deploy.rollout import Driver
    from lmops.serve.app import create_app
    from lmops.store import Store
    from lmops.workspace import Workspace

    ws = Workspace(folder / "ws")
    cfg = override(ws.config(), ["auth.rate_limit_per_s=10000", "auth.burst=10000", f"rollout.window_s={window}"])
    store = Store.for_workspace(ws, cfg)
    app = create_app(cfg, None, store, journal_dir=ws.state / "request-journal" / str(port), endpoint="ep", ws=ws)
    server = app.state.server
    server.router.preload()

    def broken(idx, cache):
        raise RuntimeError("a broken model")

    server.router.backends["green"].engine._forward = broken
    driver = Driver(store, cfg, endpoint="ep", changed=server.router.wake, name=f"bench:{port}").start()
    try:
        uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False)
    finally:
        driver.stop()


def endpoint(folder: Path) -> None:
    from lmops.deploy.models import resolve_deployment
    from lmops.store import Store
    from lmops.workspace import Workspace

    ws = Workspace(folder / "ws")
    with Store.for_workspace(ws, ws.config()) as store:
        store.endpoints.create("ep", "bench")
        for d in ("blue", "green"):
            store.endpoints.deploy(resolve_deployment(ws, ws.config(), "ep", d, str(folder / "model")), "bench")


def client(url: str, key: str, prompts: list[str], stop: threading.Event) -> list[tuple[float, float, int, str]]:
    """(sent, received, status, deployment) of each request until stop."""
    out, i = [], 0
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        while not stop.is_set():
            sent = time.monotonic()
            r = http.post("/v1/completions", json={"model": "ep", "prompt": prompts[i % len(prompts)],
                                                   "max_tokens": 8})
            out.append((sent, time.monotonic(), r.status_code, r.headers.get("x-lmops-deployment", "")))
            i += 1
    return out


def trial(folder: Path, url: str, key: str, prompts: list[str], clients: int, window: float) -> dict:
    from lmops.deploy import rollout
    from lmops.store import Store
    from lmops.workspace import Workspace

    ws = Workspace(folder / "ws")
    cfg = ws.config()
    stop = threading.Event()
    with Store.for_workspace(ws, cfg) as store, ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, url, key, prompts, stop) for _ in range(clients)]
        time.sleep(1.0)  # traffic on stable first
        r = rollout.start(store, cfg, "ep", "green", "bench", strategy="canary", steps=[50, 100], window_s=window)
        deadline = time.monotonic() + window * 4 + 30
        while store.rollouts.get(r.id).status not in ("aborted", "succeeded") and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)  # traffic on stable after
        stop.set()
        rows = sorted(x for f in futures for x in f.result())
        done = store.rollouts.get(r.id)
    errors = [x for x in rows if x[2] >= 500]
    on_green = [x for x in rows if x[3] == "green"]
    if done.status != "aborted" or not errors or not on_green:
        raise RuntimeError(f"the canary was not rolled back ({done.status}: {done.message})")
    first_error, back = min(x[1] for x in errors), max(x[0] for x in on_green)
    after = [x for x in rows if x[0] > back]
    assert all(x[3] == "blue" and x[2] == 200 for x in after)
    return {"requests": len(rows), "errors": len(errors), "first_error_to_stable_s": back - first_error,
            "after": len(after), "message": done.message}


class Server(serve_load.Server):
    def __init__(self, folder: Path, window: float):
        self.start([__file__, "--serve", str(folder), "{port}", str(window)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--window", type=float, default=5.0, help="rollout.window_s, seconds")
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(folder)
        endpoint(folder)
        key, prompts = (folder / "key").read_text(), json.loads((folder / "prompts.json").read_text())
        with Server(folder, args.window) as server:
            results = [trial(folder, server.url, key, prompts, args.clients, args.window) for _ in range(args.trials)]
    target = args.window + 1.0
    print(f"broken canary (steps 50,100), rollout.window_s {args.window:g} s, tick 1 s, {args.clients} clients")
    for i, res in enumerate(results, 1):
        print(f"trial {i}: {res['requests']} requests, {res['errors']} failed; first error to traffic on stable "
              f"{res['first_error_to_stable_s']:.2f} s (target <= {target:g} s); {res['after']} requests after, "
              f"all blue\n  {res['message']}")
    worst = max(r["first_error_to_stable_s"] for r in results)
    print(f"worst {worst:.2f} s vs target {target:g} s: {'met' if worst <= target else 'MISSED'}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    else:
        main()
