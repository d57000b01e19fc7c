"""Training: one loop, reproducible and resumable, on one process or many (torchrun, DDP).

Batches are drawn from the token shards by one seeded generator that every process runs in
lockstep; each process takes its share of each global batch. So the data a step sees depends on
the seed and the step alone, not on the number of processes, and resuming restores it exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from lmops.checkpoint import CKPT_NAME, Checkpoint, model_of, save_checkpoint
from lmops.config import Config
from lmops.errors import Interrupted, LmopsError
from lmops.model import GPT, GPTConfig

RUN_INFO = "run.json"  # beside the checkpoint: the run's MLflow id, dataset, evaluation


def read_run_info(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_INFO
    return json.loads(path.read_text()) if path.exists() else {}


def update_run_info(run_dir: Path, **info) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / RUN_INFO).write_text(json.dumps({**read_run_info(run_dir), **info}, indent=2, default=str))


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_type: str) -> Dist:
    """Join the process group torchrun describes in the environment (nothing to do without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(d.local_rank)
    return d


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LmopsError(f"train.device: {name!r} asked for, but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """Native bf16 matmul (AVX512-BF16 or AMX): there bf16 autocast trains small models faster.
    oneDNN's own check (`mkldnn._is_mkldnn_bf16_supported`) also says yes on plain AVX-512, where bf16
    is emulated: a training step there took 2.3x as long as in float32 (4 x 128 model, batch 32 x 128).
    And when PyTorch's kernels are capped below AVX-512 (ATEN_CPU_CAPABILITY=avx2), bf16 is emulated too."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":  # kernels capped (ATEN_CPU_CAPABILITY=avx2) or none
        return False
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def lr_at(step: int, cfg) -> float:
    """Linear warmup, then cosine decay from lr to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


class Batches:
    """Random windows of block_size + 1 tokens from a memmapped token array."""

    def __init__(self, tokens: np.ndarray, block_size: int, seed: int):
        self.tokens, self.block = tokens, block_size
        self.gen = torch.Generator().manual_seed(seed)

    def draw(self, n: int) -> torch.Tensor:
        """Offsets of n windows; every process draws the same ones."""
        return torch.randint(len(self.tokens) - self.block - 1, (n,), generator=self.gen)

    def windows(self, offsets, device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.tokens[o:o + self.block + 1] for o in np.asarray(offsets)]).astype(np.int64)
        data = torch.from_numpy(rows)
        if device.type == "cuda":
            data = data.pin_memory().to(device, non_blocking=True)
        # contiguous: strided ids cost the embedding and loss backward about 25% of a small model's step
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()


@torch.no_grad()
def evaluate(model: GPT, val: np.ndarray, meta: dict, cfg: Config, device, dtype) -> dict[str, float]:
    """Loss, perplexity and bits per byte on eval_batches * batch_size windows spread evenly over
    the whole validation split (deterministic: the same windows at every evaluation)."""
    block, bs = cfg.model.block_size, cfg.train.batch_size
    n = cfg.train.eval_batches * bs
    offsets = np.unique(np.linspace(0, len(val) - block - 1, n).astype(np.int64))
    batches = Batches(val, block, 0)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(offsets), bs):
        x, y = batches.windows(offsets[i:i + bs], device)
        with autocast(device, dtype):
            _, loss = model(x, y)
        total += loss.item() * len(x)
        count += len(x)
    model.train(was_training)
    return loss_metrics(total / count, meta)


def loss_metrics(loss: float, meta: dict) -> dict[str, float]:
    """Mean nats per validation token -> loss, perplexity and bits per byte. Tokens per byte (from the
    shards' meta) turns nats per token into bits per byte, comparable across tokenizers."""
    bpb = loss * meta["val_tokens"] / max(1, meta["val_bytes"]) / math.log(2)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bpb": bpb}


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_optimizer(model: GPT, cfg) -> torch.optim.Optimizer:
    # the trainable parameters only (a LoRA run's adapters)
    groups = [g | {"params": ps} for g in model.param_groups(cfg.weight_decay)
              if (ps := [p for p in g["params"] if p.requires_grad])]
    try:  # fused AdamW: one kernel for all parameters (CPU since torch 2.4, CUDA)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def check_resumable(ckpt: Checkpoint, cfg: Config, gpt_cfg, tokens_meta: dict, base=None,
                    lora_cfg: dict | None = None) -> None:
    """Resuming continues the same model on the same data; anything else is a new run."""
    lora = ckpt.meta.get("lora")
    if (lora is not None) != (cfg.train.method == "lora"):
        raise LmopsError(f"--resume: {ckpt.path} was trained with train.method {'lora' if lora else 'full'}, "
                         f"lmops.yaml says {cfg.train.method}; restore it, or start a new run with another --run name")
    if lora is not None:
        if lora_cfg != lora:
            raise LmopsError(f"--resume: train.lora is {lora_cfg} but {ckpt.path} was trained with {lora}; "
                             "restore it in lmops.yaml, or start a new run with another --run name")
        started = (ckpt.meta.get("base") or {}).get("sha256")
        if base is None or base.sha256 != started:
            raise LmopsError(f"--resume: a LoRA run continues on the base weights it started from (sha256 "
                             f"{str(started)[:12]}), but train.init_from names "
                             f"{'none' if base is None else f'{base.label} (sha256 {base.sha256[:12]})'}; set "
                             f"train.init_from to {(ckpt.meta.get('base') or {}).get('version') or 'that base'}")
    old = ckpt.meta.get("config", {})
    for section in ("model", "tokenizer", "data"):
        for key, new_value in getattr(cfg, section).model_dump(mode="json").items():
            old_value = old.get(section, {}).get(key)
            if old_value != new_value:
                raise LmopsError(
                    f"--resume: {section}.{key} is {new_value!r} but the checkpoint {ckpt.path} was trained with "
                    f"{old_value!r}; restore it in lmops.yaml, or start a new run with another --run name"
                )
    if ckpt.model_config != gpt_cfg or ckpt.meta.get("tokens", {}).get("tokenizer_sha256") != tokens_meta.get("tokenizer_sha256"):
        raise LmopsError(f"--resume: the tokenizer or data changed since {ckpt.path} was written; start a new run")


@dataclass
class TrainResult:
    checkpoint: Path
    step: int
    metrics: dict[str, float]


def train(cfg: Config, tokens_dir: Path, run_dir: Path, tokenizer_dir: Path | None = None, resume: bool = False,
          stop_at: int | None = None, progress: bool = True, log: Callable[[str], None] = print,
          on_metrics: Callable[[dict], None] | None = None, base=None) -> TrainResult:
    """Train cfg.model on the shards in tokens_dir; checkpoints and metrics.jsonl go to run_dir.

    base: a lmops.warmstart.BaseModel to start from (its weights; a fresh optimizer and schedule),
    instead of random weights; refused when its shape or tokenizer does not fit. With train.method
    lora (lmops/lora.py) its weights stay frozen and only adapters train; the checkpoint holds the
    merged weights, and the adapters under "lora." (a resume reads the base's weights again).

    tokenizer_dir: copied into run_dir when a run starts, so the run keeps the tokenizer it was
    trained with however the workspace's changes later.

    stop_at: checkpoint and return after this step (the schedule still spans max_steps), so a run can
    be split across sessions and continued with resume=True.
    on_metrics: called on the main process with each step's row (step, loss, lr, tokens_per_s, time,
    and val_loss/val_ppl/val_bpb at evaluations), e.g. to log to an experiment tracker.
    """
    from lmops.tokenizer import load_meta, load_tokens

    tc = cfg.train
    device = resolve_device(tc.device)
    ddp = setup_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    dtype = resolve_dtype(tc.dtype, device)

    meta = load_meta(tokens_dir)
    train_tokens, val_tokens = load_tokens(tokens_dir, "train"), load_tokens(tokens_dir, "val")
    block = cfg.model.block_size
    if len(train_tokens) <= block + 1 or len(val_tokens) <= block + 1:
        raise LmopsError(
            f"{tokens_dir}: the corpus gives {len(train_tokens)} training and {len(val_tokens)} validation tokens, "
            f"too few for one context window of model.block_size={block}; add text or lower model.block_size"
        )

    lora_cfg = None
    if tc.method == "lora":
        from lmops import lora

        if base is None:
            raise LmopsError("train.method lora trains adapters on a base model, and none was given: set "
                             "train.init_from (champion, a version, a run folder, a Hugging Face Llama folder)")
        lora_cfg = lora.settings(tc)
    if base is not None:
        from lmops.warmstart import base_config

        gpt_cfg = base_config(base, cfg.model, meta)
    else:
        gpt_cfg = GPTConfig.from_settings(cfg.model, meta["vocab_size"])
    torch.manual_seed(tc.seed)
    model = model_of(gpt_cfg)  # lmops's GPT; a base of another architecture is a TransformersLM
    if base is not None and (not resume or lora_cfg):  # a LoRA run's checkpoint has merged weights, not the base's
        Checkpoint(base.checkpoint).load_model_into(model)
    if lora_cfg:
        lora_cfg = lora.fit(lora_cfg, model)
        lora.apply(model, lora_cfg)
    model = model.to(device)
    optimizer = make_optimizer(model, tc)
    batches = Batches(train_tokens, block, tc.seed)
    ckpt_path = run_dir / CKPT_NAME
    step, best = 0, float("inf")
    if resume:
        if not ckpt_path.exists():
            raise LmopsError(f"--resume: no checkpoint at {ckpt_path}; run without --resume to start")
        ckpt = Checkpoint(ckpt_path)
        check_resumable(ckpt, cfg, gpt_cfg, meta, base, lora_cfg)
        if lora_cfg:
            lora.load_adapters(model, ckpt.tensors(lora.PREFIX))
        else:
            ckpt.load_model_into(model)
        ckpt.load_optimizer_into(optimizer)
        torch.set_rng_state(ckpt.rng("torch"))
        batches.gen.set_state(ckpt.rng("batches"))
        if device.type == "cuda" and ckpt.rng("cuda") is not None:
            torch.cuda.set_rng_state(ckpt.rng("cuda"))
        step, best = ckpt.meta["step"], ckpt.meta.get("best_val_loss", best)
        if step >= tc.max_steps:
            raise LmopsError(f"--resume: {ckpt_path} is at step {step}, train.max_steps is {tc.max_steps}; raise max_steps to continue")
        if ddp.main:
            log(f"resuming {run_dir.name} at step {step}")
    elif ckpt_path.exists() and ddp.main:
        log(f"note: starting over; {ckpt_path} will be replaced (use --resume to continue it)")

    fwd = torch.compile(model) if tc.compile else model
    if ddp.world > 1:
        fwd = torch.nn.parallel.DistributedDataParallel(fwd, device_ids=[ddp.local_rank] if device.type == "cuda" else None)

    run_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None and ddp.main and not resume:
        for f in Path(tokenizer_dir).glob("*.json"):
            shutil.copy2(f, run_dir / f.name)
    # kept open for the run (line-buffered: a crash keeps every finished row), not reopened per step
    metrics_out = open(run_dir / "metrics.jsonl", "a", encoding="utf-8", buffering=1) if ddp.main else None
    last_step = min(tc.max_steps, stop_at) if stop_at else tc.max_steps
    tokens_per_step = tc.batch_size * tc.grad_accum * ddp.world * block
    metrics: dict[str, float] = {}

    def checkpoint(at: int) -> None:
        if not ddp.main:
            return
        rng = {"torch": torch.get_rng_state(), "batches": batches.gen.get_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        save_checkpoint(ckpt_path, model, optimizer, rng, {
            "step": at, "best_val_loss": best, "config": cfg.to_dict(), "tokens": meta, "tokens_dir": str(tokens_dir),
            "run": run_dir.name,
            "metrics": metrics, "base": base.to_dict() if base is not None else None, "lora": lora_cfg,
        }, model_state=lora.merged_state(model, lora_cfg) if lora_cfg else None,
            extra={lora.PREFIX + k: v for k, v in lora.adapter_tensors(model).items()} if lora_cfg else None)

    def record(row: dict) -> None:
        if ddp.main:
            metrics_out.write(json.dumps(row) + "\n")
            if on_metrics is not None:
                on_metrics(row)

    if ddp.main:
        log(f"model: {model.num_params() / 1e6:.2f}M parameters, {gpt_cfg.n_layer} layers, width {gpt_cfg.d_model}, "
            f"context {block}; {len(train_tokens):,} training tokens; device {device}, {str(dtype).removeprefix('torch.')}"
            + (f", {ddp.world} processes" if ddp.world > 1 else "")
            + (f"; starting from {base.label}" if base is not None and not resume else ""))
        if lora_cfg:
            trainable, total = lora.counts(model)
            log(f"LoRA r={lora_cfg['r']}, alpha {lora_cfg['alpha']:g} on {', '.join(lora_cfg['target_modules'])}: "
                f"{trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%)"
                + ("" if base.version else f"; {base.label} is no registered version, so registering this run "
                   "registers its merged weights (there is no base version to merge the adapter with later)"))

    bar = _progress(progress and ddp.main, total=last_step, completed=step)
    say = bar.console.print if bar.tasks else log
    t_start = t_last = time.perf_counter()
    tokens_since = 0
    try:
        with bar:
            task = bar.tasks[0].id if bar.tasks else None
            while step < last_step:
                lr = lr_at(step, tc)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                offsets = batches.draw(tc.batch_size * tc.grad_accum * ddp.world)
                mine = offsets.view(tc.grad_accum, ddp.world, tc.batch_size)[:, ddp.rank]
                loss_sum = torch.zeros((), device=device)
                for micro in range(tc.grad_accum):
                    x, y = batches.windows(mine[micro], device)
                    sync = micro == tc.grad_accum - 1 or ddp.world == 1
                    with (contextlib.nullcontext() if sync else fwd.no_sync()), autocast(device, dtype):
                        _, loss = fwd(x, y)
                    (loss / tc.grad_accum).backward()
                    loss_sum += loss.detach()
                if tc.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_since += tokens_per_step
                train_loss = loss_sum.item() / tc.grad_accum
                if not math.isfinite(train_loss):
                    raise LmopsError(f"training diverged at step {step} (loss {train_loss}); lower train.lr "
                                     f"(now {tc.lr}) and start again; the last checkpoint is kept at {ckpt_path}")
                now = time.perf_counter()
                tok_s = tokens_since / max(now - t_last, 1e-9)
                if now - t_last > 2.0:
                    t_last, tokens_since = now, 0
                if task is not None:
                    bar.update(task, completed=step, loss=train_loss, tok_s=tok_s)
                row = {"step": step, "loss": train_loss, "lr": lr, "tokens_per_s": tok_s, "time": now - t_start}
                if step % tc.eval_interval == 0 or step == last_step:
                    if ddp.main:
                        metrics = evaluate(model, val_tokens, meta, cfg, device, dtype)
                        best = min(best, metrics["val_loss"])
                        row.update(metrics)
                        say(f"step {step}: train loss {train_loss:.4f}, val loss {metrics['val_loss']:.4f}, "
                            f"val bpb {metrics['val_bpb']:.4f}")
                record(row)
                if step % tc.checkpoint_interval == 0 or step == last_step:
                    checkpoint(step)
                if ddp.world > 1 and (step % tc.checkpoint_interval == 0 or step % tc.eval_interval == 0):
                    dist.barrier()
        if ddp.world > 1:
            dist.barrier()
    except KeyboardInterrupt:
        checkpoint(step)
        raise Interrupted(f"interrupted at step {step}; checkpoint saved to {ckpt_path}") from None
    finally:
        if metrics_out is not None:
            metrics_out.close()
        if ddp.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return TrainResult(ckpt_path, step, metrics)


def _progress(enabled: bool, total: int, completed: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tok_s]:,.0f} tok/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=Console(stderr=True), disable=not enabled,
    )
    if enabled:
        bar.add_task("train", total=total, completed=completed, loss=float("nan"), tok_s=0.0)
    return bar
