"""Re-run of an unchanged pipeline: every step cached. Target: under 3 s wall, process start included.

  python benchmarks/pipeline_rerun.py

Makes a workspace on the demo corpus with a small model, runs `lmops pipeline run` once (timed too,
for scale), then times the unchanged re-run as a user would type it, over a few repetitions, and one
run after a change to train.max_steps (only train and the steps after it run again).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMALL = ["model.n_layer=2", "model.d_model=64", "model.block_size=64", "train.max_steps=100",
         "train.eval_interval=100", "tokenizer.vocab_size=1024"]


def lmops(*args: str) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lmops.cli", *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"lmops {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return wall, proc.stderr


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        lmops("init", str(ws))
        from lmops.data.demo import write_demo_corpus

        write_demo_corpus(ws / "corpus")
        cfg = ws / "lmops.yaml"  # SMALL goes into lmops.yaml, so the re-run is a plain `lmops pipeline run`
        cfg.write_text(_apply(cfg.read_text(), SMALL))
        first, _ = lmops("pipeline", "run", "-w", str(ws))
        reruns = []
        for _ in range(5):
            wall, err = lmops("pipeline", "run", "-w", str(ws))
            assert err.count("cached") >= 7, err
            reruns.append(wall)
        cfg.write_text(_apply(cfg.read_text(), ["train.max_steps=120"]))
        changed, err = lmops("pipeline", "run", "-w", str(ws))
        print(f"first run (ingest .. promote, 100 steps):  {first:6.1f} s")
        print(f"unchanged re-run, median of 5:             {statistics.median(reruns):6.2f} s   "
              f"(each: {' '.join(f'{r:.2f}' for r in reruns)}; target < 3 s)")
        print(f"re-run after train.max_steps 100 -> 120:   {changed:6.1f} s")


def _apply(text: str, items: list[str]) -> str:
    """Set section.key=value in an lmops.yaml as `lmops init` writes it (one 'key: value' line each)."""
    import yaml

    data = yaml.safe_load(text) or {}
    for item in items:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        data.setdefault(section, {})[name] = yaml.safe_load(value)
    return yaml.safe_dump(data, sort_keys=False)


if __name__ == "__main__":
    main()
