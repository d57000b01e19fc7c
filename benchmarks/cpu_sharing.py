"""Training beside a live server on one machine's cores (what `lmops loop` does when it retrains).

  python benchmarks/cpu_sharing.py [--corpus ../shared/data/tinyshakespeare.txt] [--rounds 3] [--seconds 25]
                                   [--clients 8] [--max-tokens 128]

Two processes share the machine: `lmops serve --model <checkpoint>` on 127.0.0.1 (serve_load.py's random
4 layers x 256 model, byte-level BPE 2048, auth + moderation + request log + metrics on, as `lmops serve`
runs) and a training run (lmops.train.train, char tokenizer, 4 layers x 128, context 64, batch 32, on the
first --slice characters of tinyshakespeare; no evaluation or checkpoint inside the measured window).
Five configurations, alternating over --rounds rounds (order reversed every other round; this machine's
speed drifts), each measured over a window of --seconds:

  train alone, naive    the training run with PyTorch's defaults: nice 0, no environment changes
  train alone, polite   the training run after lmops.resources.background() (passive OpenMP waits,
                        nice 10, threads = available cores): what `lmops loop` does
  serve alone           --clients concurrent streaming clients (serve_load.py's client), each sending
                        --max-tokens-token completions one after another until the window ends
  both, naive           the clients against the server while the naive training run trains
  both, polite          the same beside the polite training run

The server process runs throughout (idle while training runs alone; its CPU is counted then too). A
training process is started per measurement and measured only after its first WARMUP_STEPS steps; its
tokens/s count the steps that end inside the window. CPU time per process from /proc/PID/stat
(utime + stime, every thread) over the same window; the clients run in this process and their CPU is
shown too (they share the cores). Reported per side: throughput beside the other as a share of its alone
throughput, CPU cores it got (CPU-seconds / window), and throughput per CPU-second beside vs alone: near
1 means it turned the CPU it got into work as well as alone (no collapse from oversubscription); well
below 1 means threads burned their share waiting (spinning) or thrashing.
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
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import aiohttp
import serve_load  # the server's model and the streaming client

WARMUP_STEPS = 30
TRAIN = [
    "tokenizer.kind=char", "model.n_layer=4", "model.n_head=4", "model.n_kv_head=4", "model.d_model=128",
    "model.block_size=64", "train.batch_size=32", "train.max_steps=1000000", "train.warmup_steps=30",
    "train.lr=2e-3", "train.eval_interval=1000000", "train.eval_batches=1", "train.checkpoint_interval=1000000",
]
TOKENS_PER_STEP = 32 * 64
CLK_TCK = os.sysconf("SC_CLK_TCK")
CONFIGS = ["train alone, naive", "train alone, polite", "serve alone", "both, naive", "both, polite"]
ONE_THREAD = ["train alone, polite 1 thread", "both, polite 1 thread"]  # --one-thread: background(threads=1) too
BATCH = ["train alone, polite SCHED_BATCH", "both, polite SCHED_BATCH"]  # --batch: and the SCHED_BATCH policy


# ----------------------------------------------------------------------------- the training process

def train_worker(ws: str, tokens_dir: str, out: str, stop: str, mode: str) -> None:
    """Train until the stop file appears; write each step's end time (CLOCK_MONOTONIC, shared by processes)."""
    threads = None
    if mode.startswith("polite"):
        from lmops.resources import background

        if mode == "politebatch":
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        threads = background(1 if mode == "polite1" else None)
    import torch

    from lmops.config import override
    from lmops.train import train
    from lmops.workspace import Workspace

    cfg = override(Workspace(Path(ws)).config(), TRAIN)
    times: list[float] = []

    class Stop(Exception):
        pass

    def on_metrics(row: dict) -> None:
        times.append(time.monotonic())
        if len(times) == WARMUP_STEPS:
            print("ready", flush=True)
        if len(times) % 4 == 0 and os.path.exists(stop):
            raise Stop

    try:
        train(cfg, Path(tokens_dir), Path(out).parent / f"run-{os.getpid()}", progress=False, log=lambda m: None,
              on_metrics=on_metrics)
    except Stop:
        pass
    Path(out).write_text(json.dumps({"times": times, "threads": threads or torch.get_num_threads(),
                                     "nice": os.nice(0), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}))


class Trainer:
    def __init__(self, folder: Path, tokens_dir: str, mode: str, n: int):
        self.out, self.stop = folder / f"train-{n}.json", folder / f"stop-{n}"
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS")}
        self.proc = subprocess.Popen([sys.executable, __file__, "--train", str(folder / "train-ws"), tokens_dir,
                                      str(self.out), str(self.stop), mode], stdout=subprocess.PIPE, text=True, env=env)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the {mode} training process failed (exit {self.proc.wait()})")

    def finish(self, t0: float, t1: float) -> dict:
        self.stop.touch()
        if self.proc.wait(120) != 0:
            raise RuntimeError("the training process failed")
        got = json.loads(self.out.read_text())
        steps = sum(1 for t in got["times"] if t0 < t <= t1)
        return {"tok_s": steps * TOKENS_PER_STEP / (t1 - t0), "threads": got["threads"], "nice": got["nice"],
                "omp": got["omp_wait_policy"]}


# ----------------------------------------------------------------------------- measuring

def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of pid, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of the whole line


async def clients_until(url: str, key: str, prompts: list[str], clients: int, seconds: float,
                        max_tokens: int) -> list[serve_load.Result]:
    """clients streaming clients, each sending requests one after another until `seconds` have passed."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"},
                                     connector=aiohttp.TCPConnector(limit=clients),
                                     timeout=aiohttp.ClientTimeout(total=serve_load.REQUEST_TIMEOUT_S)) as http:
        deadline = time.monotonic() + seconds

        async def client(c: int) -> list[serve_load.Result]:
            out, i = [], 0
            while time.monotonic() < deadline:
                out.append(await serve_load.one_request(http, url, prompts[(c * 7 + i) % len(prompts)], max_tokens))
                i += 1
            return out

        return [r for rs in await asyncio.gather(*(client(c) for c in range(clients))) for r in rs]


def measure(config: str, server: serve_load.Server, folder: Path, tokens_dir: str, key: str, prompts: list[str],
            args, n: int) -> dict:
    trainer = None
    if config != "serve alone":
        mode = ("polite1" if config.endswith("1 thread") else "politebatch" if config.endswith("SCHED_BATCH")
                else "polite" if config.endswith("polite") else "naive")
        trainer = Trainer(folder, tokens_dir, mode, n)
    pids = {"server": server.proc.pid, "clients": os.getpid(), **({"train": trainer.proc.pid} if trainer else {})}
    t0 = time.monotonic()
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    results = []
    if config.startswith("train"):
        time.sleep(args.seconds)
    else:
        results = asyncio.run(clients_until(server.url, key, prompts, args.clients, args.seconds, args.max_tokens))
    t1 = time.monotonic()
    cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
    row = {"config": config, "wall": t1 - t0, "cpu": cpu}
    if trainer:
        row["train"] = trainer.finish(t0, t1)
    if results:
        lat = [r.latency for r in results]
        row["serve"] = {"tok_s": sum(r.output_tokens for r in results) / (t1 - t0), "requests": len(results),
                        "p50": statistics.median(lat) * 1000, "p95": serve_load.pct(lat, 95) * 1000,
                        "ttft_p50": statistics.median(r.ttft for r in results) * 1000}
    return row


# ----------------------------------------------------------------------------- the run

def prepare_training(folder: Path, corpus: Path, chars: int) -> str:
    from lmops.config import override
    from lmops.pipeline import prepare_data
    from lmops.workspace import init_workspace

    ws = init_workspace(folder / "train-ws")
    (ws.root / "corpus" / "docs.txt").unlink(missing_ok=True)
    (ws.root / "corpus" / "shakespeare.txt").write_text(corpus.read_text(encoding="utf-8")[:chars], encoding="utf-8")
    return prepare_data(ws, override(ws.config(), TRAIN), log=lambda m: None)["tokens_dir"]


def med(rows: list[dict], f) -> float:
    return statistics.median(f(r) for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt")
    ap.add_argument("--slice", type=int, default=400_000, help="characters of the corpus to train on")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=25.0, help="each measurement's window")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--one-thread", action="store_true", help="also the polite trainer at one thread (alone and beside)")
    ap.add_argument("--batch", action="store_true", help="also the polite trainer under the SCHED_BATCH policy")
    args = ap.parse_args()
    configs = CONFIGS + (ONE_THREAD if args.one_thread else []) + (BATCH if args.batch else [])
    if not args.corpus.exists():
        sys.exit(f"skipped: {args.corpus} not found (the training corpus lives in ../shared/data/)")
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"machine: {os.cpu_count()} cores, load average {load}", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        serve_load.build(folder)
        tokens_dir = prepare_training(folder, args.corpus.resolve(), args.slice)
        key, prompts = (folder / "key").read_text(), json.loads((folder / "prompts.json").read_text())
        server = serve_load.Server.__new__(serve_load.Server)
        server.start(["-m", "lmops", "serve", "--model", str(folder / "model"), "-w", str(folder / "ws"),
                      "--host", serve_load.HOST, "--port", "{port}", "--set", "serve.max_waiting=256",
                      "--set", "auth.rate_limit_per_s=10000", "--set", "auth.burst=10000"])
        try:
            asyncio.run(clients_until(server.url, key, prompts, args.clients, 3, args.max_tokens))  # warm-up
            n = 0
            for r in range(args.rounds):
                for config in (configs if r % 2 == 0 else configs[::-1]):
                    n += 1
                    row = measure(config, server, folder, tokens_dir, key, prompts, args, n)
                    row["round"] = r + 1
                    rows.append(row)
                    t, s = row.get("train"), row.get("serve")
                    print(f"round {r + 1} {config:20} cpu " + " ".join(f"{k} {v / row['wall']:.2f}" for k, v in row["cpu"].items())
                          + (f" | train {t['tok_s']:,.0f} tok/s ({t['threads']} threads, nice {t['nice']}, "
                             f"OMP_WAIT_POLICY {t['omp']})" if t else "")
                          + (f" | serve {s['tok_s']:,.0f} tok/s, p50 {s['p50']:.0f} ms, p95 {s['p95']:.0f} ms, "
                             f"{s['requests']} requests" if s else ""), flush=True)
        finally:
            server.close()
    report(rows, args)


def report(rows: list[dict], args) -> None:
    by = {c: [r for r in rows if r["config"] == c] for c in CONFIGS + ONE_THREAD + BATCH}
    by = {c: rs for c, rs in by.items() if rs}
    cores = {c: {k: med(rs, lambda r, k=k: r["cpu"][k] / r["wall"]) for k in rs[0]["cpu"]} for c, rs in by.items()}
    print(f"\nmedians of {args.rounds} rounds, {args.seconds:g} s windows; {args.clients} streaming clients x "
          f"{args.max_tokens} tokens; training 4 x 128, ctx 64, batch 32, char")
    print("\ntraining          tokens/s  share of alone  cores  tokens/CPU-s  vs alone   each round")
    pairs = [("train alone, naive", None), ("train alone, polite", None), ("both, naive", "train alone, naive"),
             ("both, polite", "train alone, polite")]
    if "both, polite 1 thread" in by:
        pairs += [("train alone, polite 1 thread", None), ("both, polite 1 thread", "train alone, polite 1 thread")]
    if "both, polite SCHED_BATCH" in by:
        pairs += [("train alone, polite SCHED_BATCH", None), ("both, polite SCHED_BATCH", "train alone, polite SCHED_BATCH")]
    for c, alone in pairs:
        rs = by[c]
        tps = med(rs, lambda r: r["train"]["tok_s"])
        eff = med(rs, lambda r: r["train"]["tok_s"] * r["wall"] / r["cpu"]["train"])
        if alone:
            a_tps = med(by[alone], lambda r: r["train"]["tok_s"])
            a_eff = med(by[alone], lambda r: r["train"]["tok_s"] * r["wall"] / r["cpu"]["train"])
            share, ratio = f"{tps / a_tps:14.0%}", f"{eff / a_eff:9.2f}"
        else:
            share, ratio = f"{'':14}", f"{'':9}"
        print(f"{c:32}{tps:8,.0f}  {share}  {cores[c]['train']:5.2f}  {eff:12,.0f} {ratio}   "
              + " ".join(f"{r['train']['tok_s']:,.0f}" for r in rs))
    print("\nserver          output tok/s  share of alone  p50 ms  p95 ms  p95 x alone  cores  tok/CPU-s  vs alone  "
          "clients' cores  each round's p95")
    a = by["serve alone"]
    a_tps, a_p95 = med(a, lambda r: r["serve"]["tok_s"]), med(a, lambda r: r["serve"]["p95"])
    a_eff = med(a, lambda r: r["serve"]["tok_s"] * r["wall"] / r["cpu"]["server"])
    for c in ("serve alone", "both, naive", "both, polite", "both, polite 1 thread", "both, polite SCHED_BATCH"):
        if c not in by:
            continue
        rs = by[c]
        tps, p95 = med(rs, lambda r: r["serve"]["tok_s"]), med(rs, lambda r: r["serve"]["p95"])
        eff = med(rs, lambda r: r["serve"]["tok_s"] * r["wall"] / r["cpu"]["server"])
        print(f"{c:26}{tps:12,.0f}  {tps / a_tps:14.0%}  {med(rs, lambda r: r['serve']['p50']):6.0f}  {p95:6.0f}  "
              f"{p95 / a_p95:11.2f}  {cores[c]['server']:5.2f}  {eff:9,.0f}  {eff / a_eff:8.2f}  "
              f"{cores[c]['clients']:14.2f}  " + " ".join(f"{r['serve']['p95']:.0f}" for r in rs))
    print("\nthe idle server while training ran alone: " + ", ".join(
        f"{c} {cores[c]['server']:.3f} cores" for c in ("train alone, naive", "train alone, polite")))


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--train":
        train_worker(*sys.argv[2:])
    else:
        main()
