"""This machine's memory bandwidth, the bound on single-stream decode (issue 14 item 4).

  python benchmarks/membw.py [--mb 400] [--repeat 10] [--threads 1,2]

Arrays of --mb MB (float32, far beyond any cache), best of --repeat, with torch at each thread count:
  read   x.sum()                    bytes = size
  gemv   W @ v, W (size/4096 x 4096)  bytes = size        (what decoding does to its weights: a matrix-vector
                                                          product streams the matrix in once)
  copy   y.copy_(x)                 bytes = 2 x size      (one read, one write)
  triad  a = b + s * c (torch.add(b, c, alpha=s, out=a))  bytes = 3 x size
Write-allocate traffic is not counted (as STREAM does not). Prints GB/s (10^9 bytes).
A decode step reads every weight once (with tied embeddings the output projection reads the whole embedding
matrix), so tokens/s <= read bandwidth / weight bytes per token.
"""

from __future__ import annotations

import argparse
import time

import torch


def best(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(mb: int, repeat: int, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    n = mb * 1_000_000 // 4 // 4096 * 4096  # whole rows of 4096 for the gemv
    a, b, c = (torch.rand(n) for _ in range(3))
    size = n * 4
    out = {}
    out["read"] = size / best(lambda: b.sum(), repeat)
    w, v = b.view(-1, 4096), torch.rand(4096)
    out["gemv"] = size / best(lambda: torch.mv(w, v), repeat)
    out["copy"] = 2 * size / best(lambda: a.copy_(b), repeat)
    out["triad"] = 3 * size / best(lambda: torch.add(b, c, alpha=0.5, out=a), repeat)
    return {k: v / 1e9 for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, arrays of {args.mb} MB float32, best of {args.repeat}")
    for t in (int(x) for x in args.threads.split(",")):
        r = measure(args.mb, args.repeat, t)
        print(f"  {t} thread{'s' if t > 1 else ' '}: " + "  ".join(f"{k} {v:5.1f} GB/s" for k, v in r.items()))


if __name__ == "__main__":
    main()
