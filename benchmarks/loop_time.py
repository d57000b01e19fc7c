"""The loop's wall time, a drift alert to a promoted challenger, on a small model on this machine's cores,
and how it divides between the loop's steps; then fine-tuning from the champion against training from
scratch on the loop's new data.

  python benchmarks/loop_time.py [--corpus ../shared/data/tinyshakespeare.txt] [--champion-steps 600]
                                 [--champion-lr 2e-3] [--steps 200] [--lr 5e-4] [--mix 0.1] [--prompts 1200]
                                 [--window 10] [--eval-every 20]

The scenario of tests/test_loop.py at a benchmark's size:

1. A champion: the pipeline (ingest .. promote) on tinyshakespeare's lines of at most 56 characters (in
   documents of 400 lines; a prompt of such a line fits the context with 4 tokens to generate), char
   tokenizer, 4 layers x 128, context 64, batch 16, --champion-steps steps at peak learning rate
   --champion-lr (cosine, warmup 20); deployed as chat/blue at 100% of endpoint chat.
2. `lmops serve --endpoint chat` in its own process on 127.0.0.1 (it writes the request log and drives
   the canary's rollout, as in production).
3. --prompts Latin prompts through the server (4 tokens each), then a monitor run over their window: drift
   alerts. From here on one client sends prompts without pause (Latin and English alternating), as
   production traffic would go on.
4. `lmops loop watch --interval 1s` in its own process (it lowers its priority, lmops/resources.py):
   ingest the window's prompts -> train from the champion (--steps steps at --lr, a fine-tuning rate,
   otherwise the champion's settings; the new dataset holds the prompts as --mix of its characters,
   data.mix, the rest corpus documents) ->
   compare on both splits -> deploy at 0% and canary (loop.steps 10/50/100, rollout.window_s --window
   seconds each) -> promoted. Steps timed from the loop run's audit entries (loop.<step> on loop:<id>),
   the pipeline's sub-steps from its step records, the canary's from the rollout's audit entries.
5. Fine-tuning against from scratch, on the loop's mixed dataset as the loop tokenized it (the
   champion's tokenizer): the same settings, --steps steps, validation loss every --eval-every steps;
   the step at which each reaches the from-scratch model's final validation loss; at the loop's
   learning rate (--lr) and again at the champion's (--champion-lr). Nothing else runs then.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

HOST = "127.0.0.1"
LINES_PER_DOC = 400
MAX_LINE = 56  # a prompt of at most this many characters, with 4 to generate, fits the context of 64
LATIN = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et "
         "dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris nisi aliquip ex ea "
         "commodo consequat duis aute irure reprehenderit voluptate velit esse cillum fugiat nulla pariatur "
         "excepteur sint occaecat cupidatat non proident sunt culpa qui officia deserunt mollit anim id est "
         "laborum").split()


def settings(steps: int, lr: float, mix: float, window: float) -> list[str]:
    return [
        "tokenizer.kind=char", "model.n_layer=4", "model.n_head=4", "model.n_kv_head=4", "model.d_model=128",
        "model.block_size=64", "train.batch_size=16", f"train.max_steps={steps}", "train.warmup_steps=20",
        f"train.lr={lr:g}", f"train.eval_interval={steps}", "train.eval_batches=8", "train.checkpoint_interval=100",
        "evaluate.max_new_tokens=8",
        "monitor.sample=64", "monitor.min_requests=20", "monitor.reference_size=400", "monitor.false_alarm_rate=0.001",
        "monitor.calibration_rounds=100", "monitor.permutations=200", "monitor.repeat_s=0",
        "data.use_production_prompts=true", f"data.mix={mix:g}", "loop.on_alert=retrain", "loop.endpoint=chat", "loop.cooldown_s=0",
        "loop.max_retrains_per_day=10", "loop.steps=[10,50,100]",
        f"rollout.window_s={window:g}", "rollout.tick_interval_s=0.5", "rollout.min_requests=8",
        "serve.endpoint_poll_s=0.5", "auth.rate_limit_per_s=100000", "auth.burst=100000",
    ]


def latin_lines(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = (" ".join(rng.choice(LATIN) for _ in range(rng.randint(4, 14))).capitalize() + "." for _ in range(4 * n))
    return [line for line in lines if len(line) <= MAX_LINE][:n]


def quiet(msg: str) -> None:
    pass


def ts(s) -> datetime:
    t = s if isinstance(s, datetime) else datetime.fromisoformat(s)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


class Traffic(threading.Thread):
    """One client sending prompts one after another (4 tokens each) until stopped."""

    def __init__(self, http: httpx.Client, prompts: list[str]):
        super().__init__(daemon=True)
        self.http, self.prompts, self.stop, self.sent, self.failed = http, prompts, threading.Event(), 0, 0

    def run(self) -> None:
        while not self.stop.is_set():
            r = self.http.post("/v1/completions", json={"model": "chat", "prompt": self.prompts[self.sent % len(self.prompts)],
                                                        "max_tokens": 4, "temperature": 0})
            self.sent += 1
            self.failed += r.status_code != 200


def send(http: httpx.Client, prompts: list[str]) -> None:
    for p in prompts:
        r = http.post("/v1/completions", json={"model": "chat", "prompt": p, "max_tokens": 4, "temperature": 0})
        r.raise_for_status()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--champion-steps", type=int, default=600, help="training steps of the champion")
    ap.add_argument("--steps", type=int, default=200, help="training steps of the challenger (train.max_steps of the loop)")
    ap.add_argument("--champion-lr", type=float, default=2e-3, help="the champion's peak learning rate")
    ap.add_argument("--lr", type=float, default=5e-4, help="the challenger's (train.lr of the loop)")
    ap.add_argument("--mix", type=float, default=0.1, help="data.mix: the prompts' share of the new dataset's characters")
    ap.add_argument("--prompts", type=int, default=1200, help="shifted prompts in the alert's window")
    ap.add_argument("--window", type=float, default=10.0, help="rollout.window_s: each canary step's window")
    ap.add_argument("--eval-every", type=int, default=20, help="validation loss every this many steps (part 5)")
    ap.add_argument("--corpus", type=Path, default=Path(__file__).resolve().parent.parent.parent / "shared" / "data"
                    / "tinyshakespeare.txt")
    args = ap.parse_args()
    if not args.corpus.exists():
        sys.exit(f"skipped: {args.corpus} not found (the corpus lives in ../shared/data/)")
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"machine: {os.cpu_count()} cores, load average {load}", flush=True)

    from lmops import registry
    from lmops.config import override
    from lmops.data.dataset import iter_documents, load_dataset
    from lmops.deploy.models import resolve_deployment
    from lmops.monitor import alerts as monitor_alerts
    from lmops.monitor.run import run as monitor_run
    from lmops.pipeline import run_pipeline
    from lmops.store import Store, utcnow
    from lmops.workspace import init_workspace

    sets = settings(args.steps, args.lr, args.mix, args.window)
    with tempfile.TemporaryDirectory() as tmp:
        ws = init_workspace(Path(tmp) / "ws")
        (ws.root / "corpus" / "docs.txt").unlink(missing_ok=True)
        lines = [ln for ln in args.corpus.read_text(encoding="utf-8").splitlines() if len(ln) <= MAX_LINE]
        for i in range(0, len(lines), LINES_PER_DOC):  # documents, so that the loop's mix can subsample them
            (ws.root / "corpus" / f"part{i // LINES_PER_DOC:03d}.txt").write_text(
                "\n".join(lines[i:i + LINES_PER_DOC]), encoding="utf-8")
        cfg = override(ws.config(), sets)
        t = time.perf_counter()
        out = run_pipeline(ws, override(cfg, [f"train.max_steps={args.champion_steps}", f"train.lr={args.champion_lr:g}",
                                              f"train.eval_interval={args.champion_steps}"]), log=quiet)
        assert out.outputs["promote"]["champion"] == "1"
        print(f"champion v1: pipeline {time.perf_counter() - t:.1f} s ({args.champion_steps} steps)", flush=True)
        store = Store.for_workspace(ws, cfg)
        store.endpoints.create("chat", "bench")
        store.endpoints.deploy(resolve_deployment(ws, cfg, "chat", "blue", "lmops-model@1"), "bench", traffic=100)
        _, secret = store.keys.create("traffic", "inference", "bench")
        english = [ln.strip() for _, t in iter_documents(load_dataset(ws.state, registry.lineage(ws, cfg, "@champion")["dataset"]["id"]), "val")
                   for ln in t.splitlines() if ln.strip()]
        random.Random(0).shuffle(english)
        latin = latin_lines(args.prompts + 400, seed=1)

        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        set_args = [a for s in sets for a in ("--set", s)]
        env = {**os.environ, "LMOPS_WORKSPACE": str(ws.root), "LMOPS_USER": "loop"}
        server = subprocess.Popen([sys.executable, "-m", "lmops", "serve", "--endpoint", "chat", "--host", HOST,
                                   "--port", str(port), *set_args], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        loop_proc = None
        http = httpx.Client(base_url=f"http://{HOST}:{port}", headers={"Authorization": f"Bearer {secret}"}, timeout=60)
        traffic = None
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if http.get("/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not start")
                time.sleep(0.2)

            t1 = utcnow()
            send(http, latin[:args.prompts])
            while len(store.requests.rows(since=t1, endpoint="chat", columns=("id",))) < args.prompts:
                time.sleep(0.2)  # the server's request log writes in batches
            t = time.perf_counter()
            until = utcnow()
            report = monitor_run(ws, cfg, store, endpoint="chat", window=until - t1, until=until)
            raised = monitor_alerts.record(store, cfg, report, "monitor")
            monitor_s = time.perf_counter() - t
            drift = [a for a in raised if a.signal in cfg.loop.signals]
            if not drift:
                sys.exit(f"no drift alert: {[(a.signal, a.message) for a in raised]}")
            alert_at = max(ts(a.ts) for a in drift)
            print(f"monitor run: {monitor_s:.1f} s, {len(drift)} drift alerts ({', '.join(sorted({a.signal for a in drift}))})",
                  flush=True)

            loop_log = open(Path(tmp) / "loop.log", "w")  # noqa: SIM115 (the loop process's output, until the end)
            traffic = Traffic(http, [p for pair in zip(latin[args.prompts:], english) for p in pair])
            traffic.start()
            loop_proc = subprocess.Popen([sys.executable, "-m", "lmops", "loop", "watch", "--interval", "1s",
                                          "--no-drive", *set_args], env=env, stdout=loop_log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 1200
            while True:
                runs = store.loop.list(5)
                if runs and not runs[0].active:
                    break
                if loop_proc.poll() is not None:
                    raise RuntimeError(f"lmops loop watch exited: {(Path(tmp) / 'loop.log').read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the loop did not finish within 20 minutes: {runs[0].step if runs else None}, "
                                       f"{runs[0].reason if runs else None}")
                time.sleep(0.5)
            done_at = utcnow()
        finally:
            if traffic is not None:
                traffic.stop.set()
                traffic.join(60)
            http.close()
            for proc in (loop_proc, server):
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGINT if proc is loop_proc else signal.SIGTERM)
                    proc.wait(60)
            if loop_proc is not None:
                loop_log.close()
        run = runs[0]
        print(f"loop run {run.id}: {run.status} ({run.outcome}): {run.reason}")
        print(f"traffic during the loop: {traffic.sent} requests, {traffic.failed} failed")
        if run.details.get("dataset"):
            totals = load_dataset(ws.state, run.details["dataset"]).manifest["totals"]
            print(f"the loop's dataset: {totals}")
        for split, sides in (run.details.get("evaluation") or {}).items():
            if split in ("old", "new"):
                print(f"  {split} split, bits per byte: champion {sides['champion']['val_bpb']:.4f}, "
                      f"challenger {sides['challenger']['val_bpb']:.4f} ({sides['champion']['texts']} texts)")
        breakdown(store, run, alert_at, done_at)
        if run.details.get("pipeline_run") is not None:
            compare_training(ws, cfg, store, run, args, Path(tmp))
        store.close()


def breakdown(store, run, alert_at: datetime, done_at: datetime) -> None:
    entries = store.audit.list(2000, subject=f"loop:{run.id}")[::-1]
    when = {e.action.removeprefix("loop."): ts(e.timestamp) for e in entries}
    names = {"triggered": "alert -> loop run started (watch tick, process start, decide)",
             "ingested": "ingest the window's prompts -> mixed dataset",
             "trained": "pipeline: tokenize, train from the champion, evaluate, register",
             "evaluated": "compare champion and challenger on both splits",
             "canary": "deploy at 0% + start the canary",
             "promoted": "canary windows (10% / 50% / 100%) + promote"}
    print("\nstep                                                          wall s   share")
    prev, total = alert_at, ((when.get("promoted") or done_at) - alert_at).total_seconds()
    for action, label in names.items():
        if action not in when:
            continue
        d = (when[action] - prev).total_seconds()
        print(f"{label:60}{d:8.1f}  {d / total:6.1%}")
        prev = when[action]
    print(f"{'alert -> ' + ('promoted' if run.outcome == 'promoted' else f'the end ({run.outcome})'):60}{total:8.1f}")
    pr = run.details.get("pipeline_run")
    if pr is not None:
        steps = store.pipeline.get_run(pr).steps
        print("  pipeline steps: " + ", ".join(f"{s.name} {s.duration_s:.1f} s" + (" (cached)" if s.cached else "")
                                               for s in steps if s.duration_s is not None))
    if "canary" in when:
        end = when.get("promoted") or done_at
        others = [e for e in store.audit.list(5000)[::-1] if not e.subject.startswith("loop:")
                  and when["evaluated"] <= ts(e.timestamp) <= end and not e.action.startswith("key.")]
        print("  after the comparison (audit, seconds after loop.canary): " + ", ".join(
            f"{e.action} {(ts(e.timestamp) - when['canary']).total_seconds():+.1f}" for e in others))


def compare_training(ws, cfg, store, run, args, tmp: Path) -> None:
    import torch

    from lmops.checkpoint import Checkpoint
    from lmops.config import override
    from lmops.model import GPT, GPTConfig
    from lmops.tokenizer import load_meta, load_tokens
    from lmops.train import evaluate, resolve_device, resolve_dtype, train
    from lmops.warmstart import resolve

    steps = {s.name: s for s in store.pipeline.get_run(run.details["pipeline_run"]).steps}
    tokens_dir = Path(steps["tokenize"].outputs["tokens_dir"])
    meta, val = load_meta(tokens_dir), load_tokens(tokens_dir, "val")
    base = resolve(ws, cfg, run.details["base"].rsplit("@", 1)[1])
    print(f"\nfine-tuning vs from scratch on the loop's dataset ({meta['vocab_size']} tokens, the champion's "
          f"tokenizer), {args.steps} steps, validation loss every {args.eval_every} steps "
          f"(train.eval_batches {cfg.train.eval_batches} x batch {cfg.train.batch_size} windows of its validation split)")
    for label, lr in ((f"the loop's settings (lr {args.lr:g})", args.lr),
                      (f"the champion's learning rate ({args.champion_lr:g})", args.champion_lr)):
        ft = override(cfg, [f"train.eval_interval={args.eval_every}", "train.checkpoint_interval=1000000",
                            f"train.lr={lr:g}"])
        device = resolve_device(ft.train.device)
        dtype = resolve_dtype(ft.train.dtype, device)
        curves = {}
        for side, b in (("from scratch", None), ("from the champion", base)):
            torch.manual_seed(ft.train.seed)
            model = GPT(GPTConfig.from_settings(ft.model, meta["vocab_size"]))
            if b is not None:
                Checkpoint(b.checkpoint).load_model_into(model)
            with torch.no_grad():
                rows = [(0, evaluate(model.to(device), val, meta, ft, device, dtype)["val_loss"])]
            t = time.perf_counter()
            train(ft, tokens_dir, tmp / f"ft-{lr:g}-{len(curves)}", progress=False, log=quiet, base=b,
                  on_metrics=lambda r, rows=rows: rows.append((r["step"], r["val_loss"])) if "val_loss" in r else None)
            curves[side] = (rows, time.perf_counter() - t)
        target = curves["from scratch"][0][-1][1]
        print(f"\n{label}")
        print(f"{'':22}{'loss at step 0':>15}{'final loss':>12}{f'first step <= {target:.4f}':>24}{'train wall':>12}")
        for side, (rows, wall) in curves.items():
            hit = next((s for s, loss in rows if loss <= target), None)
            print(f"{side:22}{rows[0][1]:>15.4f}{rows[-1][1]:>12.4f}{str(hit) if hit is not None else 'not reached':>24}"
                  f"{wall:>10.1f} s")
        print("val loss at step    " + " ".join(f"{s:>6}" for s, _ in curves["from scratch"][0]))
        for side, (rows, _) in curves.items():
            print(f"  {side:18}" + " ".join(f"{loss:6.3f}" for _, loss in rows))


if __name__ == "__main__":
    main()
