"""Two server replicas on PostgreSQL against one server on SQLite: throughput, p95 latency, and that the
request log keeps every request in both.

  python benchmarks/replicas.py [--rounds 3] [--requests-per-client 2] [--max-tokens 64]

The model, prompts and clients are benchmarks/serve_load.py's (a random 4 x 256 model; aiohttp streaming
clients, ignore_eos). 32 clients per round. Sides, alternating over rounds:

- sqlite:  one `lmops serve` process, the store (keys, request log) in the workspace's SQLite file;
- pg x1:   one of those two processes alone (PostgreSQL and Redis, one replica);
- pg x2:   two processes on one PostgreSQL database (127.0.0.1:5432, a schema of its own), the clients
  split between them as a load balancer would (16 each), the rate limit shared through Redis
  (127.0.0.1:6379) as replicas behind one address would run.

After each round the request log is read until it holds as many rows for the round as requests were answered (the journal is written ahead and
flushed in batches), or 30 s pass (then: lost rows). Both replicas share the machine's 2 cores, so two
replicas cannot be faster here than one; the run shows what sharing the store costs and that nothing
is lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import serve_load  # noqa: E402
from serve_load import HOST, build, load, pct  # noqa: E402

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
CLIENTS = 32


def serve(folder: Path, port: int, url: str, redis: str) -> None:
    import uvicorn

    from lmops.config import override
    from lmops.serve.app import create_app
    from lmops.serve.source import ModelSource
    from lmops.store import Store
    from lmops.workspace import Workspace

    ws = Workspace(folder / "ws")
    sets = ["serve.max_batch=32", "serve.max_waiting=256", "auth.rate_limit_per_s=10000", "auth.burst=10000"]
    if url != "-":
        sets.append(f"store.database_url={url}")
    if redis != "-":
        sets.append(f"auth.rate_limit_url={redis}")
    cfg = override(ws.config(), sets)
    store = Store.for_workspace(ws, cfg)
    app = create_app(cfg, ModelSource(ws, cfg, str(folder / "model")), store,
                     journal_dir=ws.state / "request-journal" / str(port))
    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False)


class Server(serve_load.Server):
    def __init__(self, folder: Path, url: str = "-", redis: str = "-"):
        self.start([__file__, "--serve", str(folder), "{port}", url, redis])


def count_rows(store, since) -> int:
    return len(store.requests.list(100_000, since=since))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    import psycopg

    from lmops.store import Store

    schema = f"lmops_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True)
    admin.execute(f'CREATE SCHEMA "{schema}"')
    pg_url = f"{PG}?options=-csearch_path%3D{schema}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            build(folder)  # its key is in the workspace's SQLite store; PostgreSQL gets one of its own
            keys = {"sqlite": (folder / "key").read_text()}
            prompts = json.loads((folder / "prompts.json").read_text())
            with Store.open(pg_url) as pg:  # creates the schema's tables before two servers race to
                keys["pg"] = pg.keys.create("bench", "inference", "bench")[1]
            sides = run(folder, keys, prompts, pg_url, args)
    finally:
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        admin.close()
    print(f"{CLIENTS} streaming clients x {args.requests_per_client} requests x {args.max_tokens} tokens, "
          f"{args.rounds} rounds alternating")
    for name, rounds in sides.items():
        rps = [r["rps"] for r in rounds]
        p95 = [r["p95_ms"] for r in rounds]
        lost = sum(r["lost"] for r in rounds)
        print(f"{name:8s}: requests/s {' '.join(f'{x:.1f}' for x in rps)}; p95 E2EL ms {' '.join(f'{x:.0f}' for x in p95)}; "
              f"request-log rows lost {lost} of {sum(r['answered'] for r in rounds)}")


def run(folder: Path, keys: dict[str, str], prompts: list[str], pg_url: str, args) -> dict[str, list[dict]]:
    from lmops.store import Store, utcnow
    from lmops.workspace import Workspace

    ws = Workspace(folder / "ws")
    sides: dict[str, list[dict]] = {"sqlite": [], "pg x1": [], "pg x2": []}
    lite_server = Server(folder)
    pg_servers = [Server(folder, pg_url, "redis://127.0.0.1:6379/14") for _ in range(2)]
    try:
        with Store.for_workspace(ws) as lite, Store.open(pg_url) as pg:
            for i in range(args.rounds):
                for name in list(sides)[::1 if i % 2 == 0 else -1]:
                    since = utcnow()
                    if name == "sqlite":
                        results, wall = asyncio.run(load(lite_server.url, keys["sqlite"], prompts, CLIENTS,
                                                         args.requests_per_client, args.max_tokens))
                        store = lite
                    else:
                        servers = pg_servers if name == "pg x2" else pg_servers[:1]

                        async def both():
                            return await asyncio.gather(*(load(s.url, keys["pg"], prompts, CLIENTS // len(servers),
                                                               args.requests_per_client, args.max_tokens)
                                                          for s in servers))
                        parts = asyncio.run(both())
                        results, wall = [r for rs, _ in parts for r in rs], max(w for _, w in parts)
                        store = pg
                    answered = len(results) + (2 if name == "pg x2" else 1)  # the warm-up requests too
                    deadline = time.monotonic() + 30
                    while (rows := count_rows(store, since)) < answered and time.monotonic() < deadline:
                        time.sleep(0.2)
                    sides[name].append({"rps": len(results) / wall, "p95_ms": pct([r.latency for r in results], 95) * 1000,
                                        "answered": answered, "lost": max(0, answered - rows)})
    finally:
        for s in [lite_server, *pg_servers]:
            s.close()
    return sides


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        main()
