"""`lmops monitor run` over 100,000 logged requests, Evidently's drift report on the same prompts, and each
drift signal's false alarm rate on in-distribution windows and detection rate on shifted ones.

  python benchmarks/monitor_speed.py [--requests 100000] [--rounds 3] [--windows 100]
                                     [--evidently-python /path/to/venv/bin/python]

Corpus: ../shared/data/tinyshakespeare.txt when present (the team's reference corpus), else lmops's demo
corpus. It is ingested (a dataset version with a validation split); the model is the monitor tests'
character bigram model of the training split (tests/monitor/conftest.py: a real GPT whose numbers are a
bigram LM's), and, for timing, also a GPT of lmops's default size (4 x 128) with random weights: the
model signals' cost depends on the model, their statistics' on nothing but the sample sizes.

1. Speed: N requests in the request log (SQLite, prompts = held-out lines, answers = other lines), one
   endpoint deployment; `run()` with every signal, median of --rounds (the first run also reads the
   reference: it is timed like the others). Target: <= 10 s on 2 cores.
2. Evidently (if --evidently-python names an interpreter with evidently installed, run there as a child
   process on the same prompts, written to a file): its DataDriftPreset over text descriptors of the
   prompts (length, OOV share, non-letter share) for the same window and reference sizes as lmops, and
   over all N prompts, timed alike. Alternating sides over rounds.
3. Rates: --windows in-distribution windows (random held-out lines, 200 prompts each) and as many of
   each shift (Latin, Russian, Python-like code), each judged as a monitor run judges it (thresholds
   calibrated on the reference, alpha split over the signals). Printed per signal, and for the run as
   a whole (any signal alerting).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from lmops.checkpoint import save_checkpoint  # noqa: E402
from lmops.config import override  # noqa: E402
from lmops.data.dataset import iter_documents, load_dataset  # noqa: E402
from lmops.data.demo import demo_corpus  # noqa: E402
from lmops.deploy.models import resolve_deployment  # noqa: E402
from lmops.model import GPT, GPTConfig  # noqa: E402
from lmops.monitor import features as F  # noqa: E402
from lmops.monitor.run import answer_signals, model_signals, prompt_signals, run, signal_alpha  # noqa: E402
from lmops.store import Store, utcnow  # noqa: E402
from lmops.tokenizer import load_tokenizer, save_tokenizer  # noqa: E402
from lmops.workspace import init_workspace  # noqa: E402
from monitor.conftest import bigram_model, latin_lines, russian_lines  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
WINDOW = 200

CODE = ["def {f}(x, y):", "    return {f}(x) + {n}", "for i in range({n}):", "    if x[i] > {n}: break",
        "import os, sys  # {f}", "{f} = [x * {n} for x in range(10)]", "class {F}({F}Base):", "    pass"]


def code_lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    names = ["load", "parse", "step", "merge", "scale"]
    out = []
    for _ in range(n):
        f = rng.choice(names)
        out.append(rng.choice(CODE).format(f=f, F=f.capitalize(), n=rng.randint(1, 999)))
    return out


EVIDENTLY = r'''
import json, sys, time
import pandas as pd
from evidently import Report
from evidently.presets import DataDriftPreset
data = json.load(open(sys.argv[1]))
def frame(texts):
    return pd.DataFrame({"length": [len(t) for t in texts],
                         "words": [len(t.split()) for t in texts],
                         "non_letter": [sum(not c.isalpha() for c in t) / max(1, len(t)) for t in texts],
                         "upper": [sum(c.isupper() for c in t) / max(1, len(t)) for t in texts]})
out = {}
for name, (ref, cur) in data.items():
    t = time.perf_counter()
    r, c = frame(ref), frame(cur)
    snapshot = Report([DataDriftPreset()]).run(reference_data=r, current_data=c)
    result = snapshot.dict()
    out[name] = {"seconds": time.perf_counter() - t, "rows": [len(ref), len(cur)],
                 "drift": [m.get("value") for m in result["metrics"][:1]]}
print(json.dumps(out, default=str))
'''


def setup(folder: Path):
    text = SHAKESPEARE.read_text(encoding="utf-8") if SHAKESPEARE.is_file() else demo_corpus()
    ws = init_workspace(folder / "ws")
    (ws.root / "corpus" / "docs.txt").write_text(text, encoding="utf-8")
    cfg = override(ws.config(), ["tokenizer.kind=char", f"store.database_url=sqlite:///{folder / 'lmops.db'}"])
    from lmops.pipeline import prepare_data

    out = prepare_data(ws, cfg, log=lambda m: None)
    tok = load_tokenizer(Path(out["tokenizer_dir"]))
    version = load_dataset(ws.state, out["dataset"])
    train = "\n".join(t for _, t in iter_documents(version, "train"))
    held = [ln.strip() for _, t in iter_documents(version, "val") for ln in t.splitlines() if ln.strip()]
    random.Random(0).shuffle(held)
    bigram = folder / "bigram"
    save_tokenizer(tok, bigram)
    save_checkpoint(bigram / "ckpt.safetensors", bigram_model(tok, train), meta={"step": 0})
    default = folder / "default"
    save_tokenizer(tok, default)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), n_layer=4, n_head=4, n_kv_head=4, d_model=128, mlp_hidden=352,
                        block_size=256, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True))
    save_checkpoint(default / "ckpt.safetensors", gpt, meta={"step": 0})
    cfg = override(cfg, [f"monitor.reference={out['dataset']}"])
    return ws, cfg, tok, held, {"bigram": bigram, "default": default}, "shakespeare" if SHAKESPEARE.is_file() else "demo"


def fill(store: Store, dep, held: list[str], n: int) -> None:
    now = utcnow()
    rows = []
    for i in range(n):
        ok = i % 100 != 0
        rows.append(dict(ts=now - timedelta(seconds=3500 * (n - i) / n), request_id=f"b{i}", route="/v1/completions",
                         endpoint="bench", deployment=dep.name, model_version=dep.model_version,
                         status_code=200 if ok else 503, prompt=held[i % len(held)],
                         completion=held[(i * 7 + 3) % len(held)][:60] if ok else None, prompt_tokens=40,
                         completion_tokens=16 if ok else None, ttft_s=0.05 + (i % 13) * 0.01, latency_s=0.4,
                         finish_reason="length" if ok else None))
        if len(rows) == 5000:
            store.requests.log(rows)
            rows = []
    store.requests.log(rows)


def speed(ws, cfg, held, models, n: int, rounds: int, tag: int = 0) -> list[dict]:
    out = []
    for name, folder in models.items():
        store = Store.for_workspace(ws, override(cfg, [f"store.database_url=sqlite:///{folder / f'log{tag}.db'}"]))
        store.endpoints.create("bench", "bench")
        dep = resolve_deployment(ws, cfg, "bench", "blue", str(folder))
        store.endpoints.deploy(dep, "bench", traffic=100)
        t = time.perf_counter()
        fill(store, dep, held, n)
        filled = time.perf_counter() - t
        times, report = [], None
        for _ in range(rounds):
            t = time.perf_counter()
            report = run(ws, cfg, store, "bench", window=timedelta(hours=1), record=False)
            times.append(time.perf_counter() - t)
        (g,) = report.groups
        by = {r.signal: r for r in g.results}
        out.append({"model": name, "requests": g.requests, "median_s": statistics.median(times), "all_s": times,
                    "signals": len(g.results), "text_sample": by["prompt_tokens_js"].n_window,
                    "model_sample": by["prompt_nll"].n_window, "log_write_s": filled})
        store.close()
    return out


def rates(cfg, tok, held: list[str], model, windows: int) -> tuple[dict, dict]:
    """Per signal and per run: share of windows alerting, in-distribution and for each shift."""
    mc = cfg.monitor
    rng = np.random.default_rng(1)
    half = min(mc.reference_size, len(held) // 2)
    ref_lines, pool = held[:half], held[half:]  # windows draw held-out lines the reference did not
    ref_p = F.prompt_features(ref_lines, tok)
    ref_m = F.model_features(model, tok, ref_lines[:2 * mc.sample], max_tokens=mc.max_tokens)
    shifts = {"in-distribution": lambda i: [pool[j] for j in rng.choice(len(pool), WINDOW, replace=False)],
              "latin": lambda i: latin_lines(WINDOW, seed=i), "russian": lambda i: russian_lines(WINDOW, seed=i),
              "code": lambda i: code_lines(WINDOW, seed=i)}
    per_signal: dict[str, dict[str, float]] = {}
    per_run: dict[str, float] = {}
    for name, make in shifts.items():
        hits: dict[str, int] = {}
        any_alert = 0
        for i in range(windows):
            texts = make(i)
            results = prompt_signals(ref_p, F.prompt_features(texts, tok), cfg, rng, "ref")
            results += model_signals(ref_m, F.model_features(model, tok, texts[:mc.sample], max_tokens=mc.max_tokens),
                                     cfg, rng, "ref")
            alerted = False
            for r in results:
                a = r.value is not None and r.threshold is not None and r.value > r.threshold
                hits[r.signal] = hits.get(r.signal, 0) + a
                alerted |= a
            any_alert += alerted
        for s, h in hits.items():
            per_signal.setdefault(s, {})[name] = h / windows
        per_run[name] = any_alert / windows
    return per_signal, per_run


def evidently(python: str, held: list[str], n: int, cfg) -> dict | None:
    m = min(WINDOW * 10, cfg.monitor.reference_size // 2)
    data = {"same sizes as lmops": (held[:m], held[m:2 * m]),
            f"all {n} prompts": (held[:cfg.monitor.reference_size], [held[i % len(held)] for i in range(n)])}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(data, f)
    script = Path(f.name).with_suffix(".py")
    script.write_text(EVIDENTLY)
    p = subprocess.run([python, str(script), f.name], capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        print("evidently failed:", p.stderr.strip().splitlines()[-3:])
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--windows", type=int, default=100)
    ap.add_argument("--evidently-python", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        ws, cfg, tok, held, models, corpus = setup(Path(tmp))
        print(f"corpus: {corpus}; {len(held)} held-out lines; alpha per signal {signal_alpha(cfg):.2g} "
              f"(false_alarm_rate {cfg.monitor.false_alarm_rate} per run)")
        ev = None
        for rnd in range(2 if args.evidently_python else 1):  # alternate: lmops, evidently, lmops, evidently
            for r in speed(ws, cfg, held, models, args.requests, args.rounds, rnd):
                print(f"[round {rnd + 1}] lmops monitor run, {r['model']} model: {r['requests']} requests, {r['signals']} "
                      f"signals, median {r['median_s']:.2f} s (runs {', '.join(f'{x:.2f}' for x in r['all_s'])}); "
                      f"text signals on {r['text_sample']} prompts, model signals on {r['model_sample']} "
                      f"(log written in {r['log_write_s']:.1f} s, not counted)")
            if args.evidently_python:
                ev = evidently(args.evidently_python, held, args.requests, cfg)
                for name, v in (ev or {}).items():
                    print(f"[round {rnd + 1}] evidently DataDriftPreset, {name} ({v['rows'][0]} vs {v['rows'][1]} rows, "
                          f"4 text descriptors): {v['seconds']:.2f} s")
        from lmops.checkpoint import Checkpoint

        model = Checkpoint(models["bigram"] / "ckpt.safetensors").model().eval()
        per_signal, per_run = rates(cfg, tok, held, model, args.windows)
        cols = ["in-distribution", "latin", "russian", "code"]
        print(f"\nalert rate over {args.windows} windows of {WINDOW} prompts (model signals on {cfg.monitor.sample}), "
              "bigram model:")
        print("| signal | " + " | ".join(cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for s, v in per_signal.items():
            print(f"| {s} | " + " | ".join(f"{100 * v.get(c, 0):.0f}%" for c in cols) + " |")
        print("| **run (any signal)** | " + " | ".join(f"{100 * per_run[c]:.0f}%" for c in cols) + " |")


if __name__ == "__main__":
    main()
