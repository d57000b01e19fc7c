"""The whole model in one file: a decoder-only transformer of the Llama family.

RMSNorm, rotary position embeddings (the "rotate half" layout Hugging Face Llama uses, so export is
a renaming of weights), SwiGLU MLP, PyTorch's scaled_dot_product_attention, optional grouped-query
attention and tied embeddings, and a KV-cache forward for generation.

Query/key/value and gate/up projections are fused into one matrix each: on small widths a CPU spends
more time launching matmuls than in them, so one large matmul beats three small ones. The Hugging
Face converter (lmops/hf.py) splits them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    """Resolved architecture (no defaults here: they live in lmops.config.ModelConfig)."""

    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    d_model: int
    mlp_hidden: int
    block_size: int
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool
    dropout: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_settings(cls, model_cfg, vocab_size: int) -> GPTConfig:
        """From lmops.config.ModelConfig: fill n_kv_head and mlp_hidden when left to None."""
        d = model_cfg.model_dump()
        d["n_kv_head"] = d["n_kv_head"] or d["n_head"]
        d["mlp_hidden"] = d["mlp_hidden"] or 32 * math.ceil(8 * d["d_model"] / 3 / 32)
        return cls(vocab_size=vocab_size, **d)

    def to_dict(self) -> dict:
        return asdict(self)


def rope_tables(cfg: GPTConfig, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (length, head_dim/2), computed in float32 as Hugging Face does."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device) / cfg.head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); rotate the pair (x[i], x[i + D/2]) by the position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class KVCache:
    """Keys and values of every layer for a batch of sequences that advance together."""

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already cached

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None, mask: torch.Tensor | None):
        cfg = self.cfg
        B, T, _ = x.shape
        H, KV, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        qk, v = self.qkv(x).split([(H + KV) * D, KV * D], dim=-1)
        # queries and keys rotate in one call: half the elementwise launches
        qk = apply_rope(qk.view(B, T, H + KV, D).transpose(1, 2), cos, sin)
        q, k = qk.split([H, KV], dim=1)
        v = v.view(B, T, KV, D).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if KV != H:
            k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        dtype = q.dtype
        if q.device.type == "cpu" and dtype == torch.bfloat16:
            # PyTorch's CPU flash attention is about 4x slower backwards in bf16 than in fp32, and
            # autocast would cast back to bf16: attend in fp32 with autocast off.
            with torch.autocast("cpu", enabled=False):
                y = self._attend(q.float(), k.float(), v.float(), mask).to(dtype)
        else:
            y = self._attend(q, k, v, mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))

    def _attend(self, q, k, v, mask):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
            dropout_p=self.cfg.dropout if self.training else 0.0,
        )


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache, mask):
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, cache, mask))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg, cfg.block_size)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 scaling: each residual branch adds to the stream, so shrink the projections into it.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """idx (B, T) token ids -> logits (B, T, vocab); with targets also the mean cross-entropy.

        With a cache, idx continues the cached sequences at position cache.pos.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.cfg.block_size}")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        mask = None
        if start > 0 and T > 1:  # new tokens see the whole cache and, causally, each other
            mask = torch.ones(T, start + T, dtype=torch.bool, device=idx.device).tril(diagonal=start)
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin, cache, mask)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def forward_rows(self, idx: torch.Tensor, cache, last_only: bool = True) -> torch.Tensor:
        """Serving forward: row b of idx (B, T) continues its own sequence from position cache.starts[b].

        Rows at different lengths run in one forward (continuous batching, lmops/serve/engine.py): each
        row is rotated at its own positions and masked to its own keys. `cache` has `starts` (list[int])
        and `update(layer, k, v)`, which stores each row's new keys and values at its positions and
        returns the rows' keys and values for positions [0, max(starts) + T). Returns the logits of the
        last position (B, V), or of every position (B, T, V) when last_only is False.

        The same function as forward, written with functional calls on the modules' weights: decoding
        runs about 15 small ops per layer and on a CPU the Python around each costs as much as the op,
        so it skips the module calls and folds RoPE into 3 ops (tests/serve checks it against forward).
        """
        cfg = self.cfg
        B, T = idx.shape
        H, KV, D, d = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_model
        starts = cache.starts
        end = max(starts) + T
        if end > cfg.block_size:
            raise ValueError(f"sequence of {end} tokens exceeds block_size {cfg.block_size}")
        if B == 1:  # forward's masks: none, or causal from start
            start = starts[0]
            cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]  # (T, D/2)
            mask = None
            if start > 0 and T > 1:
                mask = torch.ones(T, end, dtype=torch.bool, device=idx.device).tril(diagonal=start)
        else:
            pos = torch.tensor(starts, device=idx.device)[:, None] + torch.arange(T, device=idx.device)  # (B, T)
            cos, sin = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)  # (B, 1, T, D/2)
            mask = (torch.arange(end, device=idx.device) <= pos[..., None]).unsqueeze(1)  # (B, 1, T, end)
        x = self.embed(idx)
        # apply_rope as x * [cos, cos] + roll(x, D/2) * [-sin, sin]
        cos, sin = torch.cat((cos, cos), dim=-1).to(x.dtype), torch.cat((-sin, sin), dim=-1).to(x.dtype)
        for i, block in enumerate(self.blocks):
            attn, mlp = block.attn, block.mlp
            h = F.rms_norm(x, (d,), block.attn_norm.weight, cfg.norm_eps)
            qkv = F.linear(h, attn.qkv.weight).view(B, T, H + 2 * KV, D).transpose(1, 2)
            qk = qkv[:, :H + KV]
            qk = torch.addcmul(qk * cos, qk.roll(D // 2, dims=-1), sin)
            k, v = cache.update(i, qk[:, H:], qkv[:, H + KV:])
            if KV != H:
                k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
            y = F.scaled_dot_product_attention(qk[:, :H], k, v, attn_mask=mask, is_causal=mask is None and T > 1)
            x = x + F.linear(y.transpose(1, 2).reshape(B, T, H * D), attn.proj.weight)
            h = F.rms_norm(x, (d,), block.mlp_norm.weight, cfg.norm_eps)
            gate, up = F.linear(h, mlp.gate_up.weight).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, mlp.down.weight)
        if last_only:
            x = x[:, -1]
        return F.linear(F.rms_norm(x, (d,), self.norm.weight, cfg.norm_eps), self.lm_head.weight)

    def param_groups(self, weight_decay: float) -> list[dict]:
        return param_groups(self, weight_decay)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None,
                 stop_token: int | None = None) -> torch.Tensor:
        """Continue idx (B, T) by up to max_new_tokens, using a KV cache.

        When a sequence reaches block_size, the cache restarts from its last block_size/2 tokens
        (the model never saw longer contexts, so the window slides).
        """
        cache = KVCache(self.cfg, idx.shape[0], self.cfg.block_size, idx.device, self.embed.weight.dtype)

        def step(pending: torch.Tensor, restart: bool) -> torch.Tensor:
            if restart:
                cache.pos = 0
            return self(pending, cache=cache)[:, -1, :]

        return sliding_generate(self, step, idx, max_new_tokens, temperature, top_k, top_p, generator, stop_token)


@torch.no_grad()
def sliding_generate(model: nn.Module, step, idx: torch.Tensor, max_new_tokens: int, temperature: float,
                     top_k: int | None, top_p: float | None, generator: torch.Generator | None,
                     stop_token: int | None) -> torch.Tensor:
    """generate's loop for any model with a cache: step(pending tokens, restart) -> the last position's
    logits, restart True when the cache must start again (the window slid to the last block_size/2 tokens)."""
    was_training = model.training
    model.eval()
    block, out, length = model.cfg.block_size, idx, 0
    pending = idx[:, -block:]
    for _ in range(max_new_tokens):
        restart = length + pending.shape[1] > block
        if restart:
            pending, length = out[:, -(block // 2):], 0
        logits = step(pending, restart)
        length += pending.shape[1]
        nxt = sample(logits, temperature, top_k, top_p, generator)
        out = torch.cat((out, nxt), dim=1)
        pending = nxt
        if stop_token is not None and bool((nxt == stop_token).all()):
            break
    model.train(was_training)
    return out


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The optimizer's groups: decay matrices (linears, embeddings); never norms or biases. Tied
    parameters once."""
    params = {id(p): p for p in model.parameters()}.values()
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def sample(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0, top_k: int | torch.Tensor | None = None,
           top_p: float | torch.Tensor | None = None, generator: torch.Generator | None = None,
           uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One token id per row of logits (B, V) -> (B, 1). A number temperature <= 0 means greedy.

    temperature, top_k and top_p are one number for every row, or a tensor (B,) of each row's own (a
    top_k of 0 or >= V, a top_p of 1, keeps every token), so that a server samples all its rows in
    one go. The draw is one uniform in [0, 1) per row: `uniform` (B,) when given, so that each row can
    come from its own random stream, else from generator.
    """
    if not torch.is_tensor(temperature) and temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    B, V = logits.shape
    logits = logits.float() / torch.as_tensor(temperature, device=logits.device).reshape(-1, 1)
    if top_k is not None:
        k = torch.as_tensor(top_k, device=logits.device).reshape(-1, 1)
        on = (k > 0) & (k < V)
        if bool(on.any()):  # each row's k-th largest logit, from one topk at the largest k asked
            top = torch.topk(logits, int(k[on].max()), dim=-1).values
            kth = top.gather(-1, (k.clamp(1, top.shape[-1]) - 1).expand(B, 1))
            logits = logits.masked_fill(on & (logits < kth), float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None:
        p = torch.as_tensor(top_p, device=logits.device, dtype=probs.dtype).reshape(-1, 1).expand(B, 1)
        on = (p > 0) & (p < 1)
        if bool(on.any()):
            # Keep each token whose more likely tokens hold less than top_p of the mass (the most likely
            # always stays; a tie at the edge stays whole): the tokens at or above a threshold, found
            # from the sorted values alone. No argsort and no scatter back: on a CPU numpy's sort
            # (SIMD) of the values takes ~1/5 of torch.sort's time, which was 40% of a 32-row decode
            # step of a 4 x 256 model, and 73 ms a step at vocabulary 32000.
            rows = on.view(-1).nonzero().view(-1)
            every = len(rows) == B  # the usual case: no copy in and out of the rows
            sub = probs if every else probs[rows]
            if sub.device.type == "cpu":
                asc = torch.from_numpy(np.sort(sub.numpy(), axis=-1))
            else:
                asc = torch.sort(sub, dim=-1).values
            wide = asc.double()
            above = wide.sum(-1, keepdim=True) - wide.cumsum(dim=-1)  # mass of the tokens after each, ascending
            first = (above >= p[rows].double()).sum(-1, keepdim=True).clamp(max=V - 1)  # first kept position
            kept = sub.masked_fill(sub < asc.gather(-1, first), 0.0)
            if every:
                probs = kept
            else:
                probs = probs.clone()
                probs[rows] = kept
    # inverse CDF: one uniform per row. torch.multinomial draws an exponential for every vocabulary
    # entry, which costs more than the rest of a small model's decode step per row.
    if uniform is None:
        uniform = torch.rand(B, generator=generator, device=probs.device)
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    # the first token whose cdf passes u * total: one with probability > 0, as u * total < total
    below_total = torch.nextafter(total, torch.zeros_like(total))
    target = torch.minimum(uniform.reshape(-1, 1).to(cdf.dtype) * total, below_total)
    return torch.searchsorted(cdf, target, right=True)
