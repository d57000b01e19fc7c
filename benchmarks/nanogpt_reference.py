"""The reference: nanoGPT's CPU recipe for shakespeare_char, re-implemented from its description.

nanoGPT (github.com/karpathy/nanoGPT) README, "I only have a MacBook" / CPU command:
  python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
    --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
    --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
with the config's lr 1e-3 -> min_lr 1e-4 cosine, warmup 100, beta2 0.99, weight decay 0.1, bias False,
grad clip 1.0, float32 on CPU, AdamW not fused on CPU (nanoGPT fuses on CUDA only), random windows.
Model: GPT-2 block (LayerNorm, learned positions, GELU MLP 4x, tied embeddings), SDPA attention.

Standalone (torch + numpy only) so it measures the recipe, not lmops. Prints JSON lines:
{"step", "time" (s since this process started), "val_loss"} at each evaluation, and "tokens_per_s".
The evaluation is the one lmops uses (evenly spread fixed windows), so both sides are judged alike.

  python benchmarks/nanogpt_reference.py --corpus ../shared/data/tinyshakespeare.txt
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class LayerNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class SelfAttention(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(d), SelfAttention(d, n_head)
        self.ln_2 = LayerNorm(d)
        self.c_fc, self.gelu, self.c_proj = nn.Linear(d, 4 * d, bias=False), nn.GELU(), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(self.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab, block, n_layer, n_head, d):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.h = nn.ModuleList(Block(d, n_head) for _ in range(n_layer))
        self.ln_f = LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--max-iters", type=int, default=2000)
    ap.add_argument("--eval-interval", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=240)
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    block, batch, lr, min_lr, warmup = 64, 12, 1e-3, 1e-4, 100

    text = open(args.corpus, encoding="utf-8").read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = int(0.9 * len(text))
    train = np.array([stoi[c] for c in text[:n]], dtype=np.uint16)
    val = np.array([stoi[c] for c in text[n:]], dtype=np.uint16)

    torch.manual_seed(args.seed)
    model = GPT(len(chars), block, 4, 4, 128)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))

    def get_batch(data):
        ix = torch.randint(len(data) - block, (batch,))
        x = torch.stack([torch.from_numpy(data[i:i + block].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block].astype(np.int64)) for i in ix])
        return x, y

    offsets = np.unique(np.linspace(0, len(val) - block - 1, args.eval_windows).astype(np.int64))

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        total = 0.0
        for i in range(0, len(offsets), batch):
            rows = np.stack([val[o:o + block + 1] for o in offsets[i:i + batch]]).astype(np.int64)
            data = torch.from_numpy(rows)
            total += model(data[:, :-1], data[:, 1:]).item() * len(rows)
        model.train()
        return total / len(offsets)

    def get_lr(it):
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        ratio = (it - warmup) / (args.max_iters - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    t_train, eval_time = None, 0.0
    for it in range(1, args.max_iters + 1):
        if it == 51:
            t_train = time.perf_counter()  # steady state: skip warm-up iterations
        for g in opt.param_groups:
            g["lr"] = get_lr(it - 1)
        x, y = get_batch(train)
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if it % args.eval_interval == 0 or it == args.max_iters:
            t_eval = time.perf_counter()
            row = {"step": it, "val_loss": val_loss(), "time": time.perf_counter() - T_START}
            eval_time += time.perf_counter() - t_eval if t_train is not None else 0.0
            print(json.dumps(row), flush=True)
    steady = args.max_iters - 50
    train_time = time.perf_counter() - t_train - eval_time
    print(json.dumps({"tokens_per_s": steady * batch * block / train_time}), flush=True)


if __name__ == "__main__":
    main()
