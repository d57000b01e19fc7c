import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tokenized

from lmops import checkpoint as checkpoint_module
from lmops.checkpoint import Checkpoint
from lmops.config import override
from lmops.errors import LmopsError
from lmops.train import lr_at, train
from pathlib import Path


def weights(path):
    return Checkpoint(path).tensors("model.")


def run(ws, cfg, name, **kw):
    data = tokenized(ws, cfg)
    return train(cfg, Path(data["tokens_dir"]), ws.run_dir(name), Path(data["tokenizer_dir"]), progress=False,
                 log=lambda m: None, **kw)


def test_resume_continues_exactly(workspace, tiny_config):
    cfg = override(tiny_config, ["model.dropout=0.1", "train.grad_accum=2"])  # dropout: the RNG must resume too
    whole = run(workspace, cfg, "whole")
    first = run(workspace, cfg, "split", stop_at=5)
    assert first.step == 5 and Checkpoint(first.checkpoint).meta["step"] == 5
    second = run(workspace, cfg, "split", resume=True)
    assert second.step == 12
    a, b = weights(whole.checkpoint), weights(second.checkpoint)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    assert second.metrics == whole.metrics
    rows = [json.loads(line) for line in (workspace.run_dir("split") / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))


def test_training_lowers_the_loss_and_reports_bpb(workspace, tiny_config):
    cfg = override(tiny_config, ["train.max_steps=40", "train.eval_interval=40"])
    rows = []
    result = run(workspace, cfg, "main")
    rows = [json.loads(line) for line in (workspace.run_dir("main") / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    m = result.metrics
    assert m["val_ppl"] == pytest.approx(2.718281828 ** m["val_loss"], rel=1e-6)
    meta = Checkpoint(result.checkpoint).meta["tokens"]
    assert m["val_bpb"] == pytest.approx(m["val_loss"] * meta["val_tokens"] / meta["val_bytes"] / 0.693147180, rel=1e-6)
    assert (workspace.run_dir("main") / "tokenizer.json").exists()


def test_resume_with_incompatible_config_names_the_key(workspace, tiny_config):
    run(workspace, tiny_config, "main", stop_at=3)
    with pytest.raises(LmopsError, match=r"model.d_model is 64 but the checkpoint .* was trained with 32"):
        run(workspace, override(tiny_config, ["model.d_model=64"]), "main", resume=True)
    with pytest.raises(LmopsError, match="no checkpoint"):
        run(workspace, tiny_config, "other", resume=True)


def test_corpus_shorter_than_a_context_window(workspace, tiny_config):
    (workspace.root / "corpus" / "docs.txt").write_text("tiny corpus " * 4)
    with pytest.raises(LmopsError, match="block_size=32"):
        run(workspace, override(tiny_config, ["data.split_within_chars=20"]), "main")  # both sides get some text


def test_full_disk_during_checkpoint_keeps_the_last_good_one(workspace, tiny_config, monkeypatch):
    first = run(workspace, tiny_config, "main", stop_at=4)
    before = weights(first.checkpoint)
    real_save = checkpoint_module.save_file

    # A real full disk cannot be made here without root mounts; simulate ENOSPC after a partial write.
    def full_disk(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    with pytest.raises(LmopsError, match="No space left on device.*last good checkpoint is intact"):
        run(workspace, tiny_config, "main", resume=True)
    after = Checkpoint(first.checkpoint)
    assert after.meta["step"] == 4 and all(torch.equal(before[k], weights(first.checkpoint)[k]) for k in before)
    assert [p.name for p in workspace.run_dir("main").iterdir() if p.name.startswith(".")] == []


def test_lr_schedule():
    from lmops.config import TrainConfig

    tc = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, tc) == pytest.approx(1e-3 / 11)
    assert lr_at(10, tc) == pytest.approx(1e-3)
    assert lr_at(60, tc) == pytest.approx(5.5e-4)
    assert lr_at(110, tc) == pytest.approx(1e-4)


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_accumulation(workspace, tiny_config, tiny_sets):
    """torchrun, 2 CPU processes (gloo): each takes half of every global batch, so the result matches
    one process accumulating both halves, up to float summation order."""
    cfg = override(tiny_config, ["train.max_steps=6"])
    single = run(workspace, override(cfg, ["train.grad_accum=2"]), "single")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sets = [a for item in [*tiny_sets, "train.max_steps=6"] for a in ("--set", item)]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lmops.cli",
         "train", "--workspace", str(workspace.root), "-r", "ddp", "--no-progress", *sets],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stderr
    a, b = weights(single.checkpoint), weights(workspace.run_dir("ddp"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)



def test_a_half_written_checkpoint_of_a_killed_writer_is_removed(workspace, tiny_config):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run_dir = workspace.run_dir("main")
    run_dir.mkdir(parents=True)
    stale = run_dir / f".ckpt.safetensors.tmp-{dead.stdout.strip()}-0a1b"
    stale.write_bytes(b"half a checkpoint")
    run(workspace, tiny_config, "main")
    assert not stale.exists() and [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the CPU's flags from /proc/cpuinfo (Linux)")
def test_bf16_autocast_only_where_the_cpu_has_it_natively():
    from lmops.train import resolve_dtype

    flags = set(Path("/proc/cpuinfo").read_text().split())
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)


def test_no_bf16_autocast_when_pytorchs_kernels_are_capped_below_avx512():
    """ATEN_CPU_CAPABILITY=avx2 (what an AVX2 machine runs, or a user capping the ISA): bf16 is emulated there."""
    code = "import torch; from lmops.train import resolve_dtype; print(resolve_dtype('auto', torch.device('cpu')))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "torch.float32"
