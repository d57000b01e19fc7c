"""Ingest speed and near-duplicate recall on 10 edited copies of tinyshakespeare.

  python benchmarks/ingest_speed.py [--corpus ../shared/data/tinyshakespeare.txt]

Makes 10 files in a temporary folder, each a copy of the corpus with about 1% of its lines edited at
random (seeded: words dropped, swapped or replaced), ingests them with the default settings (each file
one document: cleaning, filters, PII scrubbing, exact and MinHash near-duplicate detection), and prints
the throughput in MB/s of input, the wall time, and whether all 9 later copies were found to be near
duplicates of the first. Target: under 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

from lmops.config import DataConfig, SafetyConfig
from lmops.data.ingest import ingest

HERE = Path(__file__).resolve().parent
COPIES = 10
EDITED = 0.01


def edited_copy(lines: list[str], rng: random.Random) -> str:
    """lines with EDITED of them changed: a word dropped, two words swapped, or a word replaced."""
    out = list(lines)
    for i in rng.sample(range(len(out)), int(len(out) * EDITED)):
        words = out[i].split()
        if len(words) < 2:
            out[i] = (out[i] + " indeed").strip()
            continue
        j, k = rng.sample(range(len(words)), 2)
        action = rng.choice(["drop", "swap", "replace"])
        if action == "drop":
            del words[j]
        elif action == "swap":
            words[j], words[k] = words[k], words[j]
        else:
            words[j] = rng.choice(["forsooth", "prithee", "anon", "marry", "zounds"])
        out[i] = " ".join(words)
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not args.corpus.is_file():
        sys.exit(f"{args.corpus}: not found (the reference corpus lives in ../shared/data/; pass --corpus FILE)")
    lines = args.corpus.read_text(encoding="utf-8").split("\n")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "corpus").mkdir()
        for i in range(COPIES):
            (root / "corpus" / f"copy-{i:02d}.txt").write_text(edited_copy(lines, rng), encoding="utf-8")
        size = sum(p.stat().st_size for p in (root / "corpus").iterdir())
        start = time.perf_counter()
        result = ingest(["corpus"], DataConfig(), SafetyConfig(), root, root / "out")
        wall = time.perf_counter() - start
    report = result.report
    near = [d for d in report["duplicates"] if d["rule"] == "near_duplicate"]
    found = sorted(d["source"] for d in near if d["duplicate_of_source"] == "corpus/copy-00.txt")
    all_found = found == [f"corpus/copy-{i:02d}.txt" for i in range(1, COPIES)] and report["documents_out"] == 1
    similarity = [d["similarity"] for d in near]
    print(f"input: {COPIES} files, {size / 1e6:.1f} MB ({EDITED:.0%} of lines edited per copy, seed {args.seed})")
    print(f"wall time: {wall:.1f} s, throughput: {size / 1e6 / wall:.2f} MB/s")
    print(f"near duplicates of copy-00 found: {len(found)}/{COPIES - 1} "
          f"(estimated Jaccard {min(similarity, default=0):.3f}-{max(similarity, default=0):.3f}); "
          f"all found: {'yes' if all_found else 'NO'}")
    print(f"documents kept: {report['documents_out']}, PII redacted: {sum(report['pii'].values())}")
    if not all_found:
        sys.exit(1)


if __name__ == "__main__":
    main()
