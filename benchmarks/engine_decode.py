"""Decode speed of the inference engine vs transformers' generate, on the same exported model.

  python benchmarks/engine_decode.py [--new-tokens 256] [--rounds 5]

1. One stream: a random 4 layers x 256 model (vocab 4096, context 512) is exported with
   `lmops.hf.export_hf` and loaded back with `transformers.LlamaForCausalLM.from_pretrained` (float32).
   All continue the same 32-token prompt greedily by the same number of new tokens: our engine with
   its default runtime (onnxruntime), the engine with runtime="torch" (eager PyTorch), and `generate`
   with its KV cache. Tokens/s = new tokens / wall time of the whole request (prefill included: 32
   tokens, a few milliseconds). After a warm-up, the three alternate for --rounds rounds (this
   machine's speed drifts) and medians are compared. The engine's tokens must equal generate's (same
   function, both greedy).
2. Batching: 8 concurrent requests (different prompt lengths), aggregate tokens/s of the engine with
   max_batch=8 against max_batch=1 (batching off: one sequence at a time), default runtime.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmops.hf import export_hf
from lmops.model import GPT, GPTConfig
from lmops.serve.engine import Engine, SamplingParams

CFG = GPTConfig(vocab_size=4096, n_layer=4, n_head=4, n_kv_head=4, d_model=256, mlp_hidden=704, block_size=512,
                rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True)


def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(CFG)
    with torch.no_grad():  # wider than the 0.02 init, so greedy tokens vary instead of repeating one id
        m.embed.weight.normal_(0, 1.0)
    return m.eval()


def engine_stream(engine: Engine, prompt: list[int], n: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    tokens = [e.token_id for e in engine.submit(prompt, SamplingParams(max_tokens=n, temperature=0))]
    return time.perf_counter() - start, tokens


def hf_stream(hf, prompt: list[int], n: int) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          do_sample=False, use_cache=True, pad_token_id=0)
    return time.perf_counter() - start, out[0, len(prompt):].tolist()


def batch_throughput(m: GPT, max_batch: int, prompts: list[list[int]], n: int) -> float:
    engine = Engine(m, max_batch=max_batch).start()
    engine_stream(engine, prompts[0], 8)  # warm-up
    start = time.perf_counter()
    handles = [engine.submit(p, SamplingParams(max_tokens=n, temperature=0)) for p in prompts]
    total = sum(len(list(h)) for h in handles)
    wall = time.perf_counter() - start
    engine.stop(0)
    return total / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        sys.exit("needs transformers: pip install -e '.[hf]'")
    import transformers

    n = args.new_tokens
    m = model()
    prompt = torch.randint(0, CFG.vocab_size, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        hf = LlamaForCausalLM.from_pretrained(export_hf(m, Path(tmp) / "hf"), dtype=torch.float32).eval()
    engine = Engine(m, max_batch=8).start()
    eager = Engine(model(), max_batch=8, runtime="torch").start()
    sides = {f"lmops engine ({engine.runtime})": lambda: engine_stream(engine, prompt, n),
             "lmops engine (torch)": lambda: engine_stream(eager, prompt, n),
             "transformers generate": lambda: hf_stream(hf, prompt, n)}

    tokens = {name: run()[1] for name, run in sides.items()}  # warm-up, and the same tokens on every side
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, run in sides.items():
            times[name].append(run()[0])
    engine.stop(0)
    eager.stop(0)

    import onnxruntime

    speed = {name: n / statistics.median(t) for name, t in times.items()}
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, model {CFG.n_layer}x{CFG.d_model}, vocab {CFG.vocab_size}, "
          f"{m.num_params() / 1e6:.1f}M parameters, fp32")
    print(f"one stream, prompt {len(prompt)} + {n} new tokens, greedy, median of {args.rounds}:")
    print(f"  {'':28s}{'tokens/s':>10s}{'vs generate':>13s}  tokens = generate's   each round")
    theirs = tokens["transformers generate"]
    for name, t in times.items():
        same = sum(a == b for a, b in zip(tokens[name], theirs))
        print(f"  {name:28s}{speed[name]:10.0f}{speed[name] / speed['transformers generate']:12.2f}x  {same:>8d}/{n}"
              f"           " + " ".join(f"{n / s:.0f}" for s in t))
    print("  target: lmops engine >= 3x transformers generate")

    prompts = [torch.randint(0, CFG.vocab_size, (8 + 24 * i,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(8)]
    on, off = batch_throughput(m, 8, prompts, n), batch_throughput(m, 1, prompts, n)
    print(f"8 concurrent requests x {n} tokens, aggregate tokens/s: max_batch=8 {on:.0f}, max_batch=1 {off:.0f} "
          f"({on / off:.2f}x)")


if __name__ == "__main__":
    main()
