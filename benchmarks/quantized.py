"""What quantized decode weights (serve.weights int8 / int4) cost in quality and give in speed, on a trained model.

  python benchmarks/quantized.py --corpus ../shared/data/tinyshakespeare.txt [--steps 600] [--rounds 7]
  python benchmarks/quantized.py --checkpoint runs/main            # a model you trained

1. Quality: a char-level model (4 layers x 256, context 256) is trained on the corpus's first 90% (or
   --checkpoint is read), and the validation split's windows (the last 10%) are scored one decode step at
   a time through the ONNX Runtime decode graph at each precision (lmops.serve.ort.nll): perplexity and
   its ratio to fp32's (bounds: int8 within 1%, int4 within 3%), and how many of 16 prompts' 128 greedy
   tokens equal fp32's (the first token that differs, if any).
2. Speed: one greedy stream of --new-tokens tokens after a 32-token prompt, at each precision in turn for
   --rounds rounds (order rotated each round), at 1 and 2 threads; decode tokens/s = tokens after the
   first / time after the first, medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmops.serve import ort
from lmops.serve.engine import Engine, SamplingParams, prepare

SETS = ["tokenizer.kind=char", "model.n_layer=4", "model.n_head=4", "model.d_model=256", "model.block_size=256",
        "train.batch_size=16", "train.warmup_steps=50", "train.lr=2e-3", "train.dtype=float32",
        "train.checkpoint_interval=100000", "data.min_documents=1"]


def trained(corpus: Path, steps: int, folder: Path):
    """A model trained on the corpus (its val split's tokens too)."""
    from lmops.config import override
    from lmops.pipeline import prepare_data
    from lmops.tokenizer import load_tokens
    from lmops.train import train
    from lmops.workspace import init_workspace

    ws = init_workspace(folder / "ws")
    (ws.root / "corpus" / corpus.name).write_text(corpus.read_text(encoding="utf-8"), encoding="utf-8")
    cfg = override(ws.config(), [*SETS, f"train.max_steps={steps}", f"train.eval_interval={steps}"])
    data = prepare_data(ws, cfg, log=lambda m: None)
    result = train(cfg, data["tokens_dir"], ws.run_dir("q"), data["tokenizer_dir"], progress=True, log=print)
    return result.checkpoint, torch.from_numpy(load_tokens(data["tokens_dir"], "val").astype("int64"))


def stream(engine: Engine, prompt: list[int], n: int) -> tuple[float, list[int]]:
    times, tokens = [], []
    for e in engine.submit(prompt, SamplingParams(max_tokens=n, temperature=0)):
        times.append(time.perf_counter())
        tokens.append(e.token_id)
    return (len(tokens) - 1) / (times[-1] - times[0]), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("../shared/data/tinyshakespeare.txt"))
    ap.add_argument("--checkpoint", type=Path, help="score this model instead of training one (its run's val split)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--windows", type=int, default=64)
    args = ap.parse_args()

    from lmops.checkpoint import Checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            ckpt = Checkpoint(args.checkpoint)
            from lmops.tokenizer import load_tokens

            val = torch.from_numpy(load_tokens(Path(ckpt.meta["tokens_dir"]), "val").astype("int64"))
            path = ckpt.path
        else:
            if not args.corpus.is_file():
                raise SystemExit(f"skipped: {args.corpus} not found (pass --corpus or --checkpoint)")
            path, val = trained(args.corpus, args.steps, Path(tmp))
        model = prepare(Checkpoint(path).model())
    cfg = model.cfg
    T = min(cfg.block_size, 128)
    starts = torch.linspace(0, len(val) - T - 1, args.windows).long()
    windows = torch.stack([val[s:s + T] for s in starts])
    print(f"model: {cfg.n_layer} x {cfg.d_model}, vocab {cfg.vocab_size}; {args.windows} validation windows of {T}")

    loss = {w: ort.nll(ort.OrtDecoder(model, weights=w), windows) for w in ort.WEIGHTS}
    greedy = {}
    for w in ort.WEIGHTS:
        engine = Engine(model, max_batch=16, weights=w).start()
        try:
            handles = [engine.submit(windows[i, :16].tolist(), SamplingParams(max_tokens=128, temperature=0))
                       for i in range(16)]
            greedy[w] = [[e.token_id for e in h] for h in handles]
        finally:
            engine.stop()
    print("\n| weights | val loss | perplexity | vs fp32 | greedy tokens equal to fp32's (16 x 128) | first difference |")
    print("|---|---:|---:|---:|---:|---|")
    for w in ort.WEIGHTS:
        same = sum(a == b for x, y in zip(greedy[w], greedy["fp32"]) for a, b in zip(x, y))
        first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(greedy[w], greedy["fp32"])]
        diffs = sorted(f for f in first if f is not None)
        ratio = torch.tensor(loss[w] - loss["fp32"]).exp().item()
        print(f"| {w} | {loss[w]:.4f} | {torch.tensor(loss[w]).exp().item():.3f} | {ratio:.4f}x | {same} / 2048 | "
              f"{'none' if not diffs else f'{len(diffs)} prompts, earliest at token {diffs[0]}'} |")

    prompt = windows[0, :32].tolist()
    print(f"\n| threads | {' | '.join(ort.WEIGHTS)} | int8 / fp32 | int4 / fp32 |")
    print("|---|" + "---:|" * (len(ort.WEIGHTS) + 2))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        engines = {w: Engine(model, max_batch=1, weights=w).start() for w in ort.WEIGHTS}
        speed = {w: [] for w in ort.WEIGHTS}
        try:
            for e in engines.values():
                stream(e, prompt, 16)  # warm-up
            order = list(ort.WEIGHTS)
            for r in range(args.rounds):
                for w in order[r % 3:] + order[:r % 3]:
                    speed[w].append(stream(engines[w], prompt, args.new_tokens)[0])
        finally:
            for e in engines.values():
                e.stop()
        med = {w: statistics.median(v) for w, v in speed.items()}
        print(f"| {threads} | " + " | ".join(f"{med[w]:,.0f}" for w in ort.WEIGHTS)
              + f" | {med['int8'] / med['fp32']:.2f}x | {med['int4'] / med['fp32']:.2f}x |")
        for w in ort.WEIGHTS:
            print(f"|   {w} rounds | {' '.join(f'{v:,.0f}' for v in speed[w])} |")


if __name__ == "__main__":
    main()
