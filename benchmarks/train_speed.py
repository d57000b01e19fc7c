"""Training speed, lmops vs nanoGPT's CPU recipe, measured side by side in one run.

  python benchmarks/train_speed.py [--corpus ../shared/data/tinyshakespeare.txt]

1. Time to validation loss <= 1.88 (char level, nats per character), each process timed from its
   launch (process start, data preparation and evaluations included): the reference, nanoGPT's CPU
   recipe for shakespeare_char (benchmarks/nanogpt_reference.py), against `lmops train` with the
   lmops recipe below. Same split (first 90% / last 10% of the characters), same evaluation (fixed
   windows spread evenly over the validation split).
2. Training tokens/s at the reference's model size, context and batch (4 layers, width 128, context
   64, batch 12), steady state (after 50 steps, no evaluation in the timed window). This machine's
   speed drifts by 10-20% from minute to minute, so the two alternate for --rounds rounds and the
   median of each is compared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = 1.88
# The lmops recipe: chosen for time to TARGET on a 2-core CPU (see benchmarks/README.md).
RECIPE = [
    "tokenizer.kind=char", "model.n_layer=4", "model.n_head=4", "model.d_model=128", "model.block_size=64",
    "train.batch_size=32", "train.max_steps=500", "train.lr=4e-3", "train.min_lr=4e-4", "train.warmup_steps=30",
    "train.eval_interval=50", "train.eval_batches=8", "train.checkpoint_interval=100000",
]
# The reference's size, context and batch, for throughput (no evaluation inside the timed window).
REFERENCE_SIZE = [
    "tokenizer.kind=char", "model.n_layer=4", "model.n_head=4", "model.d_model=128", "model.block_size=64",
    "train.batch_size=12", "train.max_steps=400", "train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=100", "train.eval_interval=100000", "train.eval_batches=1",
    "train.checkpoint_interval=100000",
]
VAL_LINE = re.compile(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)")


def watch(cmd: list[str], parse, cwd: Path | None = None, env: dict | None = None, t0: float | None = None
          ) -> tuple[list[tuple[float, int, float]], float, list[str]]:
    """Run cmd; (seconds since t0, by default its launch, step, val loss) for each evaluation it reports, the
    wall time, and its output lines."""
    start = time.perf_counter() if t0 is None else t0
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    evals, out = [], []
    for line in proc.stdout:
        out.append(line)
        hit = parse(line)
        if hit:
            evals.append((time.perf_counter() - start, *hit))
    if proc.wait() != 0:
        sys.exit(f"{' '.join(cmd[:4])} failed:\n{''.join(out[-30:])}")
    return evals, time.perf_counter() - start, out


def parse_reference(line: str):
    row = json.loads(line) if line.startswith("{") else {}
    return (row["step"], row["val_loss"]) if "val_loss" in row else None


def parse_lmops(line: str):
    m = VAL_LINE.search(line)
    return (int(m[1]), float(m[2])) if m else None


def time_to_target(evals, target: float = TARGET) -> str:
    hit = next((e for e in evals if e[2] <= target), None)
    return f"{hit[0]:6.1f} s (step {hit[1]})" if hit else "not reached"


def lmops_run(ws: Path, corpus: Path, sets: list[str], run: str) -> tuple[list, float]:
    sets_args = [a for s in [f"data.corpus=[{json.dumps(str(corpus))}]", *sets] for a in ("--set", s)]
    cmd = [sys.executable, "-m", "lmops.cli", "train", "-w", str(ws), "-r", run, "--no-progress", *sets_args]
    evals, wall, _ = watch(cmd, parse_lmops)
    return evals, wall


def tokens_per_s(metrics: Path, tokens_per_step: int, skip: int = 50) -> float:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    first, last = rows[skip - 1], rows[-1]
    return (last["step"] - first["step"]) * tokens_per_step / (last["time"] - first["time"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt")
    ap.add_argument("--rounds", type=int, default=3, help="alternating throughput rounds (median reported)")
    args = ap.parse_args()
    if not args.corpus.exists():
        sys.exit(f"{args.corpus}: not found (the reference corpus lives in ../shared/data/)")
    corpus = args.corpus.resolve()
    eval_windows = 32 * 8  # the recipe's batch_size * eval_batches: both sides score the same windows

    print("time to target: nanoGPT CPU recipe (4x128, ctx 64, batch 12, 2000 iters, fp32)", flush=True)
    ref_cmd = [sys.executable, str(HERE / "nanogpt_reference.py"), "--corpus", str(corpus)]
    ref_evals, ref_wall, _ = watch([*ref_cmd, "--eval-windows", str(eval_windows)], parse_reference)

    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        subprocess.run([sys.executable, "-m", "lmops.cli", "init", str(ws)], check=True, capture_output=True)
        print("time to target: lmops recipe " + " ".join(RECIPE), flush=True)
        ours_evals, ours_wall = lmops_run(ws, corpus, RECIPE, "recipe")  # includes tokenizer + encoding
        ref_tps, ours_tps = [], []
        for r in range(args.rounds):
            print(f"throughput round {r + 1}/{args.rounds}", flush=True)
            out = subprocess.run([*ref_cmd, "--max-iters", "400", "--eval-interval", "100000"],
                                 check=True, capture_output=True, text=True).stdout
            ref_tps.append(json.loads(out.strip().splitlines()[-1])["tokens_per_s"])
            lmops_run(ws, corpus, REFERENCE_SIZE, "throughput")
            ours_tps.append(tokens_per_s(ws / ".lmops" / "runs" / "throughput" / "metrics.jsonl", 12 * 64))

    print(f"\n{'':34}{'nanoGPT CPU recipe':>22}{'lmops':>22}")
    print(f"{'time to val loss <= 1.88':34}{time_to_target(ref_evals):>22}{time_to_target(ours_evals):>22}")
    ref_final = ref_evals[-1][2]
    print(f"{f'time to val loss <= {ref_final:.4f}':34}{time_to_target(ref_evals, ref_final):>22}"
          f"{time_to_target(ours_evals, ref_final):>22}   (the reference's final loss)")
    print(f"{'final val loss':34}{ref_evals[-1][2]:>22.4f}{ours_evals[-1][2]:>22.4f}")
    print(f"{'wall time of the whole run':34}{ref_wall:>20.1f} s{ours_wall:>20.1f} s")
    ref_med, ours_med = statistics.median(ref_tps), statistics.median(ours_tps)
    print(f"{'train tokens/s at 4x128, ctx 64, b 12':34}{ref_med:>22,.0f}{ours_med:>22,.0f}   ({ours_med / ref_med:.2f}x)")
    print(f"{'  each round':34}{' '.join(f'{t:,.0f}' for t in ref_tps):>22}{' '.join(f'{t:,.0f}' for t in ours_tps):>22}")
    print(f"\nmachine: {os.cpu_count()} cores; python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
