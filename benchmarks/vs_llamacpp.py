"""Single-stream decode speed of the lmops engine vs llama.cpp on the same exported weights (issue 14).

  python benchmarks/vs_llamacpp.py [--sizes 4x256,6x384,12x768] [--threads 1,2] [--rounds 7]
                                   [--new-tokens 256] [--lmops-weights fp32,int8,int4] [--gguf f32,f16,q8_0]
                                   [--llama-bench] [--workdir /tmp/lmops-vs-llamacpp]

Needs the llama.cpp anchor (benchmarks/setup_anchors.sh; found as benchmarks/anchors.py says) and installs
nothing: without it the script says what is missing and exits 0 (skipped).

Models: issue 14's three sizes (4 layers x 256 vocab 4096, 6 x 384 vocab 8192, 12 x 768 vocab 32000; head_dim 64,
tied embeddings, context 512), random lmops GPTs (seed 0, embeddings widened as in engine_decode.py so greedy
tokens vary), exported with `lmops.hf.export_hf` with a byte-level BPE trained here (benchmarks/anchors.py),
converted by llama.cpp's own convert_hf_to_gguf.py to f32, f16 and q8_0 GGUF. Built once and cached in --workdir.

Both sides continue the same 32 random token ids greedily by --new-tokens tokens, one stream, at the same
thread count (torch.set_num_threads before the engine is built: its ONNX Runtime session takes as many intra-op
threads; llama.cpp's n_threads = n_threads_batch = the same). lmops: `Engine(model, max_batch=1)` (its default
runtime, ONNX Runtime), the time from the first token to the last as the engine stamps them
(RequestHandle.first_token_at, finished_at). llama.cpp: its C API through llama-cpp-python's low-level
bindings, in a process of its own (the anchor's venv): one llama_decode per token and a greedy llama_sampler,
timed from the first sampled token to the last (n_ctx 512, n_batch 512, defaults otherwise: flash attention
auto, f16 KV cache). Decode tokens/s = (new tokens - 1) / that time. After a warm-up of every side, the sides
alternate for --rounds rounds (this machine drifts) and medians are compared.

Weight precision on the lmops side (--lmops-weights): passed as `weights=` to the engine when it takes that
parameter (`Engine(..., weights=)` or `lmops.serve.engine.load(..., weights=)`, issue 14 item 1); an lmops
without it is measured at fp32 only, and the script says so.

Tokens: lmops fp32 and llama.cpp f32 compute the same function, so their greedy tokens agree until a near-tie
(random weights have many) is broken differently by float rounding; printed as the length of the common prefix.
--llama-bench also runs llama.cpp's own llama-bench (tg N, no sampling, C++ loop) once per model and thread
count, to show what the Python around llama_decode costs.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anchors  # noqa: E402

PROMPT_LEN = 32


def lmops_weights_support() -> str | None:
    """How this lmops takes a weight precision: "engine" (Engine(weights=)), "load" (engine.load(weights=)), None."""
    from lmops.serve import engine as E

    if "weights" in inspect.signature(E.Engine.__init__).parameters:
        return "engine"
    if "weights" in inspect.signature(E.load).parameters:
        return "load"
    return None


def lmops_engine(hf_dir: Path, threads: int, weights: str, how: str | None):
    import torch

    from lmops.hf import import_hf
    from lmops.serve import engine as E

    torch.set_num_threads(threads)
    model = import_hf(hf_dir)
    if how == "engine":
        eng = E.Engine(model, max_batch=1, weights=weights)
    elif how == "load":  # Engine calls the module's load(model, runtime): give it the precision
        plain = E.load
        E.load = lambda m, runtime="auto", **kw: plain(m, runtime, weights=weights, **kw)
        try:
            eng = E.Engine(model, max_batch=1)
        finally:
            E.load = plain
    else:
        eng = E.Engine(model, max_batch=1)
    return eng.start()


def lmops_decode(eng, prompt: list[int], n: int) -> tuple[list[int], float, float]:
    from lmops.serve.engine import SamplingParams

    t0 = time.monotonic()
    h = eng.submit(prompt, SamplingParams(temperature=0, max_tokens=n))
    tokens = [e.token_id for e in h]
    if len(tokens) != n:
        raise RuntimeError(f"lmops gave {len(tokens)} tokens ({h.finish_reason}), wanted {n}")
    return tokens, h.first_token_at - t0, h.finished_at - h.first_token_at


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run_llama_bench(path: Path, threads: int, n: int) -> float | None:
    exe = anchors.llama_bench()
    if exe is None:
        return None
    r = subprocess.run([str(exe), "-m", str(path), "-t", str(threads), "-p", "0", "-n", str(n), "-r", "3",
                        "-o", "csv"], capture_output=True, text=True, env=anchors.worker_env())
    if r.returncode != 0:
        print(f"  llama-bench failed: {r.stderr[-500:]}")
        return None
    import csv

    rows = list(csv.DictReader(r.stdout.strip().splitlines()))
    return float(rows[-1]["avg_ts"]) if rows else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4x256,6x384,12x768")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--lmops-weights", default="fp32,int8,int4")
    ap.add_argument("--gguf", default="f32,f16,q8_0", help="llama.cpp weight types (convert_hf_to_gguf --outtype)")
    ap.add_argument("--llama-bench", action="store_true", help="also llama.cpp's own llama-bench, once per model")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "lmops-vs-llamacpp")
    args = ap.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    threads = [int(t) for t in args.threads.split(",")]
    gtypes = [g for g in args.gguf.split(",") if g]
    n = args.new_tokens
    if unknown := set(sizes) - set(anchors.SIZES):
        sys.exit(f"unknown sizes {sorted(unknown)}: one of {', '.join(anchors.SIZES)}")
    if why := anchors.missing(convert=True, python=True):
        print(f"SKIPPED: llama.cpp anchor not installed: {why}")
        return

    import onnxruntime
    import torch

    how = lmops_weights_support()
    wanted = [w for w in args.lmops_weights.split(",") if w]
    weights = wanted if how else ["fp32"]
    if how is None and wanted != ["fp32"]:
        print(f"NOTE: this lmops takes no weight precision (no `weights` parameter on Engine or engine.load): "
              f"measuring lmops at fp32 only, not {','.join(w for w in wanted if w != 'fp32')}")

    worker = anchors.LlamaCppWorker()
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, llama-cpp-python "
          f"{worker.info['version']}; llama.cpp: {worker.info['system_info'].strip()}")
    print(anchors.lmops_version())
    print(f"one greedy stream, prompt {PROMPT_LEN} + {n} new tokens, decode tokens/s = (n-1) / time after the "
          f"first token, median of {args.rounds} alternating rounds")
    prompt = torch.randint(0, 4096, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
    table = []
    try:
        for size in sizes:
            hf = anchors.build_hf(size, args.workdir)
            files = {g: anchors.gguf(hf, g) for g in gtypes}
            params = sum(p.numel() for p in __import__("safetensors.torch", fromlist=["load_file"])
                         .load_file(hf / "model.safetensors").values())
            print(f"\n== {size}, vocab {anchors.SIZES[size]['vocab_size']}: {params / 1e6:.1f}M parameters; "
                  + ", ".join(f"{g} {anchors.gguf_tensor_bytes(p) / 1e6:.1f} MB" for g, p in files.items()))
            for t in threads:
                sides = {}
                engines = []
                for w in weights:
                    try:
                        eng = lmops_engine(hf, t, w, how)
                    except Exception as err:  # one precision failing does not lose the others' figures
                        print(f"  lmops {w}: cannot build the engine: {type(err).__name__}: {err}")
                        continue
                    engines.append(eng)
                    sides[f"lmops {w}"] = (lambda e=eng: lmops_decode(e, prompt, n))
                for g, path in files.items():
                    key = f"{size}-{g}-{t}"
                    worker.load(key, path, t)
                    sides[f"llama.cpp {g}"] = (lambda k=key: worker.decode(k, prompt, n))
                tokens = {name: run()[0] for name, run in sides.items()}  # warm-up
                rates: dict[str, list[float]] = {name: [] for name in sides}
                for _ in range(args.rounds):
                    for name, run in sides.items():
                        toks, _, rest = run()
                        rates[name].append((n - 1) / rest)
                for eng in engines:
                    eng.stop(0)
                for g in files:
                    worker.unload(f"{size}-{g}-{t}")
                med = {name: statistics.median(r) for name, r in rates.items()}
                same = common_prefix(tokens.get("lmops fp32", []), tokens.get("llama.cpp f32", []))
                bench = {g: run_llama_bench(p, t, n) for g, p in files.items()} if args.llama_bench else {}
                distinct = len(set(tokens.get("lmops fp32", [])))
                print(f"-- {t} thread{'s' if t > 1 else ''}:  lmops fp32 and llama.cpp f32 agree on the first "
                      f"{same}/{n} tokens (lmops fp32's hold {distinct} distinct ids)")
                for name, r in rates.items():
                    ref = "llama.cpp f32" if "llama.cpp f32" in med else name
                    print(f"  {name:16s}{med[name]:9.1f} tok/s  ({med[name] / med[ref]:.2f}x llama.cpp f32)   "
                          + " ".join(f"{x:.0f}" for x in r))
                for g, v in bench.items():
                    if v:
                        print(f"  llama-bench tg{n} {g}: {v:.1f} tok/s (C++ loop, no sampling, 3 reps)")
                table.append((size, t, med, same, bench))
    finally:
        worker.close()

    cols = [c for c in [f"lmops {w}" for w in weights] + [f"llama.cpp {g}" for g in gtypes]
            if all(c in med for _, _, med, _, _ in table)]
    print(f"\n| model (layers x width, vocab) | threads | " + " | ".join(cols)
          + " | lmops fp32 / llama.cpp f32 | best lmops / llama.cpp q8_0 | tokens equal (fp32 vs f32) |")
    print("|---|---|" + "---:|" * len(cols) + "---:|---:|---:|")
    for size, t, med, same, _ in table:
        s = anchors.SIZES[size]
        ratio = (f"{med['lmops fp32'] / med['llama.cpp f32']:.2f}x" if "llama.cpp f32" in med else "")
        best = max(med[c] for c in cols if c.startswith("lmops"))
        q8 = f"{best / med['llama.cpp q8_0']:.2f}x" if "llama.cpp q8_0" in med else ""
        print(f"| {s['n_layer']} x {s['d_model']}, {s['vocab_size']} | {t} | "
              + " | ".join(f"{med[c]:,.0f}" if med[c] >= 100 else f"{med[c]:.1f}" for c in cols)
              + f" | {ratio} | {q8} | {same}/{n} |")
    print("targets (issue 14): lmops fp32 >= 1.2x llama.cpp f32; lmops int8/int4 >= 1.0x llama.cpp q8_0, every size")


if __name__ == "__main__":
    main()
