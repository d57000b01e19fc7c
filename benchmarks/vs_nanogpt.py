"""Training, lmops vs the real nanoGPT (github.com/karpathy/nanoGPT), its CPU recipe, side by side in one run.

  python benchmarks/vs_nanogpt.py --nanogpt /work/anchors/nanoGPT [--corpus ../shared/data/tinyshakespeare.txt]
                                  [--isa native|avx2] [--rounds 3]

--nanogpt: a checkout of nanoGPT (`git clone https://github.com/karpathy/nanoGPT`, or its files from any copy);
nothing is installed or downloaded: without it the script prints SKIPPED and the reason. The checkout is
copied into a temporary folder (it is never written to) and the corpus goes in as
data/shakespeare_char/input.txt, so nanoGPT's own prepare.py reads it instead of downloading.

1. Time to validation loss <= 1.88, each side timed from its launch, each side's own data preparation
   (nanoGPT: prepare.py; lmops: ingest, tokenizer, encoding), evaluations and checkpoint writes included.
   nanoGPT runs the command of its README for a CPU ("I only have a macbook"): config/train_shakespeare_char.py
   --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4
   --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0 (fp32 on a CPU). lmops runs
   `lmops train` with train_speed.RECIPE. Each side's val loss is its own estimate, as a user of it sees it
   (nanoGPT: 20 random batches of 12 windows; lmops: 256 fixed windows spread over the validation split), on the
   same 90/10 split of the same text.
2. Training tokens/s at nanoGPT's model size, context and batch (4 x 128, context 64, batch 12), steady state
   (steps 50 to 400, no evaluation inside), the two alternating for --rounds rounds; medians compared.

--isa avx2 runs both sides with PyTorch's kernels and oneDNN capped at AVX2 (ATEN_CPU_CAPABILITY=avx2,
ONEDNN_MAX_CPU_ISA=AVX2): what a machine without AVX-512 (and without native bf16) does, on this one;
lmops's train.dtype auto then picks float32, as it would there.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import RECIPE, REFERENCE_SIZE, TARGET, parse_lmops, time_to_target, tokens_per_s, watch  # noqa: E402

HERE = Path(__file__).resolve().parent
NANOGPT_CPU = [  # nanoGPT README, "I only have a macbook" (and the CPU of any other computer)
    "config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1",
    "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
    "--lr_decay_iters=2000", "--dropout=0.0",
]
ISA_ENV = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
ITER_LINE = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms")


def nanogpt_tokens_per_s(lines: list[str], tokens_per_iter: int, skip: int = 50) -> float:
    """From nanoGPT's own per-iteration times (`iter N: ..., time X ms`), iterations skip..end."""
    dts = [float(m[2]) / 1000 for line in lines if (m := ITER_LINE.match(line)) and int(m[1]) >= skip]
    return len(dts) * tokens_per_iter / sum(dts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", type=Path, default=Path(os.environ.get("NANOGPT_DIR", "/work/anchors/nanoGPT")),
                    help="a nanoGPT checkout (default $NANOGPT_DIR or /work/anchors/nanoGPT)")
    ap.add_argument("--corpus", type=Path, default=HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt")
    ap.add_argument("--isa", choices=sorted(ISA_ENV), default="native")
    ap.add_argument("--rounds", type=int, default=3, help="alternating throughput rounds (median reported)")
    ap.add_argument("--skip-time-to-target", action="store_true", help="throughput rounds only")
    args = ap.parse_args()
    if not (args.nanogpt / "train.py").exists() or not (args.nanogpt / "data" / "shakespeare_char" / "prepare.py").exists():
        print(f"SKIPPED: no nanoGPT checkout at {args.nanogpt} (git clone https://github.com/karpathy/nanoGPT; "
              "pass --nanogpt DIR)")
        return
    if not args.corpus.exists():
        print(f"SKIPPED: {args.corpus} not found (the reference corpus lives in ../shared/data/)")
        return
    corpus = args.corpus.resolve()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ISA_ENV[args.isa]}

    with tempfile.TemporaryDirectory() as tmp:
        ng = Path(tmp) / "nanoGPT"
        shutil.copytree(args.nanogpt, ng, ignore=shutil.ignore_patterns(".git", "out-*", "*.bin", "*.pkl"))
        data = ng / "data" / "shakespeare_char"
        shutil.copy(corpus, data / "input.txt")
        ws = Path(tmp) / "ws"
        subprocess.run([sys.executable, "-m", "lmops.cli", "init", str(ws)], check=True, capture_output=True, env=env)

        def lmops_train(sets: list[str], run: str):
            sets_args = [a for s in [f'data.corpus=["{corpus}"]', *sets] for a in ("--set", s)]
            cmd = [sys.executable, "-m", "lmops.cli", "train", "-w", str(ws), "-r", run, "--no-progress", *sets_args]
            evals, wall, lines = watch(cmd, parse_lmops, None, env)
            return evals, lines, wall

        if not args.skip_time_to_target:
            print("time to target: nanoGPT " + " ".join(NANOGPT_CPU), flush=True)
            t0 = time.perf_counter()
            watch([sys.executable, "data/shakespeare_char/prepare.py"], lambda _: None, ng, env, t0)
            ref_evals, ref_wall, ref_lines = watch([sys.executable, "train.py", *NANOGPT_CPU], parse_lmops, ng, env, t0)
            ref_run_tps = nanogpt_tokens_per_s(ref_lines, 12 * 64)
            print("time to target: lmops " + " ".join(RECIPE), flush=True)
            ours_evals, _, ours_wall = lmops_train(RECIPE, "recipe")
            ours_run_tps = tokens_per_s(ws / ".lmops" / "runs" / "recipe" / "metrics.jsonl", 32 * 64)
        else:  # the prepared data is needed for the throughput rounds
            watch([sys.executable, "data/shakespeare_char/prepare.py"], lambda _: None, ng, env)

        ref_tps, ours_tps = [], []
        throughput = [a.replace("max_iters=2000", "max_iters=400") for a in NANOGPT_CPU] + ["--eval_interval=100000"]
        for r in range(args.rounds):
            print(f"throughput round {r + 1}/{args.rounds}", flush=True)
            _, _, lines = watch([sys.executable, "train.py", *throughput], lambda _: None, ng, env)
            ref_tps.append(nanogpt_tokens_per_s(lines, 12 * 64))
            lmops_train(REFERENCE_SIZE, "throughput")
            ours_tps.append(tokens_per_s(ws / ".lmops" / "runs" / "throughput" / "metrics.jsonl", 12 * 64))

    print(f"\nISA: {args.isa}; {os.cpu_count()} cores; python {sys.version.split()[0]}")
    print(f"{'':40}{'nanoGPT (real)':>22}{'lmops':>22}")
    if not args.skip_time_to_target:
        ref_t = next((e[0] for e in ref_evals if e[2] <= TARGET), None)
        ours_t = next((e[0] for e in ours_evals if e[2] <= TARGET), None)
        ratio = f"   ({ours_t / ref_t:.2f}x the time)" if ref_t and ours_t else ""
        print(f"{f'time to val loss <= {TARGET}':40}{time_to_target(ref_evals):>22}{time_to_target(ours_evals):>22}{ratio}")
        ref_final = ref_evals[-1][2]
        print(f"{f'time to val loss <= {ref_final:.4f}':40}{time_to_target(ref_evals, ref_final):>22}"
              f"{time_to_target(ours_evals, ref_final):>22}   (nanoGPT's final)")
        print(f"{'final val loss':40}{ref_final:>22.4f}{ours_evals[-1][2]:>22.4f}")
        print(f"{'wall time of the whole run':40}{ref_wall:>20.1f} s{ours_wall:>20.1f} s")
        print(f"{'train tokens/s in those runs':40}{ref_run_tps:>22,.0f}{ours_run_tps:>22,.0f}   (batch 12 vs 32)")
        print("evaluations (s since launch, step, val loss):")
        print("  nanoGPT: " + ", ".join(f"{t:.1f}/{s}/{v:.3f}" for t, s, v in ref_evals))
        print("  lmops:   " + ", ".join(f"{t:.1f}/{s}/{v:.3f}" for t, s, v in ours_evals))
    ref_med, ours_med = statistics.median(ref_tps), statistics.median(ours_tps)
    print(f"{'train tokens/s at 4x128, ctx 64, batch 12':40}{ref_med:>22,.0f}{ours_med:>22,.0f}   ({ours_med / ref_med:.2f}x)")
    print(f"{'  each round':40}{' '.join(f'{t:,.0f}' for t in ref_tps):>22}{' '.join(f'{t:,.0f}' for t in ours_tps):>22}")


if __name__ == "__main__":
    main()
