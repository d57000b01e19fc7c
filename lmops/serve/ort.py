"""The engine's forward on ONNX Runtime: the same maths as `GPT.forward_rows`, a layer's small ops fused.

Why. A decode step on a CPU is a few dozen small operations per layer. In eager PyTorch each costs
10-25 us of dispatch, about as much as the matrix products themselves, so per-token time is set by
the count of operations rather than by memory bandwidth (benchmarks/README.md). ONNX Runtime runs a
whole graph in C++ with fused kernels made for this: `GroupQueryAttention` (rotary embedding, the
write of the new keys and values into the cache, attention over each row's own length, in one op)
and `SkipSimplifiedLayerNormalization` (residual add + RMSNorm). It decodes the benchmark model
1.9-3.3x faster than the eager forward (one thread / two), same tokens (benchmarks/engine_decode.py).

What. `OrtDecoder(model).forward_rows(idx, cache)` is a drop-in for `model.forward_rows(idx, cache)`
for the engine: same arguments (a `SlotCache` with its `row0` and `starts`), same logits of the last
position. The graph is built here from the model's own weights, which ONNX Runtime reads in place
(`add_external_initializers`: nothing is serialized, no 2 GB protobuf limit); it is never written to
disk. The cache stays the engine's `SlotCache`: each layer's keys and values for rows
row0..row0+B-1 are one contiguous block of it, bound as both the op's past and present tensors, so
GroupQueryAttention writes each row's new keys and values at that row's own length, in place.

Quantized weights (`weights="int8"` or `"int4"`, serve.weights): every linear of the graph, the output
head too, becomes a `MatMulNBits` over the weight quantized in blocks of 32 inputs (`quantize`: a scale
and a zero point per block, as llama.cpp's q8_0 / q4 formats block them) with accuracy_level 4, which
quantizes the activations to int8 inside the op so the products run on int8 dot-product instructions
(at accuracy_level 1 the int8 kernel was 10-50x slower than float32's here: no fast path). The embedding
stays float32 (a step reads one row of it). What that costs in perplexity and greedy tokens, and gives
in speed, benchmarks/quantized.py measures.

Limits, checked by `unsupported` (the engine then keeps the PyTorch forward): a float32 model on the
CPU (onnxruntime's CPU build), head_dim a multiple of 16 (its fused rotary embedding). Scoring
(`Engine.score`: log-probabilities of every prompt position) stays in PyTorch.
"""

from __future__ import annotations

import numpy as np
import torch

from lmops.model import GPT

OPSET, IR_VERSION = 21, 10  # what onnxruntime >= 1.22 (pyproject.toml) reads


def unsupported(model: GPT) -> str | None:
    """Why this model cannot decode on ONNX Runtime here, or None when it can."""
    if not isinstance(model, GPT):
        return f"the graph is written for lmops's GPT, not this {type(model).__name__}"
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        return f"{err.name} is not installed (pip install onnxruntime onnx)"
    w = model.embed.weight
    if w.device.type != "cpu":
        return f"the model is on {w.device.type}; onnxruntime's CPU build runs CPU models"
    if w.dtype != torch.float32:
        return f"the model's weights are {w.dtype}; the ONNX Runtime graph is built for float32"
    if model.cfg.head_dim % 16:
        return f"head_dim {model.cfg.head_dim} is not a multiple of 16, as GroupQueryAttention's rotary embedding needs"
    return None


WEIGHTS = ("fp32", "int8", "int4")
BLOCK = 32  # weights quantized in blocks of 32 inputs, each with its own scale (and zero point): llama.cpp's q8_0 / q4 block


def quantize(w: torch.Tensor, bits: int, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A linear's weight (N outputs, K inputs) in MatMulNBits' layout: per output row, blocks of `block`
    inputs, each stored as unsigned `bits`-bit codes q with w ~ (q - zero_point) * scale.

    Asymmetric (a zero point per block, from the block's min and max) at both widths: int8's error is
    far below what a model notices; int4 needs the zero point, a symmetric 4-bit grid wastes a level.
    Returns (codes (N, K/block, block*bits/8) uint8, scales (N, K/block) float32, zero points (N,
    K/block) uint8 for 8 bits, (N, ceil(K/block/2)) packed two per byte for 4)."""
    N, K = w.shape
    kb = -(-K // block)
    w = torch.nn.functional.pad(w.detach().float(), (0, kb * block - K)).view(N, kb, block)
    top = (1 << bits) - 1
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)  # the grid always holds 0 (padding, exact zeros)
    scale = ((hi - lo) / top).clamp(min=1e-12)
    zero = (-lo / scale).round().clamp(0, top)
    q = (w / scale[..., None] + zero[..., None]).round().clamp(0, top).to(torch.uint8)
    zero = zero.to(torch.uint8)
    if bits == 4:  # two codes per byte, the first in the low nibble
        q = q[..., 0::2] | (q[..., 1::2] << 4)
        if kb % 2:
            zero = torch.nn.functional.pad(zero, (0, 1))
        zero = zero[:, 0::2] | (zero[:, 1::2] << 4)
    return q.contiguous().numpy(), scale.contiguous().numpy(), zero.contiguous().numpy()


def dequantize(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, K: int) -> torch.Tensor:
    """The weight (N, K) quantize's output stands for: what the graph multiplies by (tests compare with it)."""
    q, z = torch.from_numpy(codes), torch.from_numpy(zeros)
    if bits == 4:
        q = torch.stack((q & 15, q >> 4), dim=-1).flatten(-2)
        z = torch.stack((z & 15, z >> 4), dim=-1).flatten(-2)[:, :q.shape[1]]
    w = (q.float() - z.float()[..., None]) * torch.from_numpy(scales)[..., None]
    return w.flatten(1)[:, :K]


class OrtDecoder:
    """One model's decode graph in an ONNX Runtime session (see the module docstring)."""

    def __init__(self, model: GPT, threads: int | None = None, weights: str = "fp32"):
        if (reason := unsupported(model)) is not None:
            raise ValueError(f"cannot run this model on onnxruntime: {reason}")
        if weights not in WEIGHTS:
            raise ValueError(f"unknown weights {weights!r}: one of {', '.join(WEIGHTS)}")
        import onnxruntime as ort

        self.cfg, self.weights = model.cfg, weights
        graph, weights = _graph(model, {"fp32": None, "int8": 8, "int4": 4}[weights])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()  # as many as PyTorch uses
        options.log_severity_level = 3  # errors only
        # the session reads these arrays in place: they, and the OrtValues over them, live as long as it does
        self._weights, self._values = weights, [ort.OrtValue.ortvalue_from_numpy(a) for a in weights.values()]
        options.add_external_initializers(list(weights), self._values)
        self.session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self._binding = self.session.io_binding()

    def forward_rows(self, idx: torch.Tensor, cache) -> torch.Tensor:
        """As GPT.forward_rows with last_only: row b of idx (B, T) continues its sequence from
        cache.starts[b] in cache row cache.row0 + b; returns the logits of the last position (B, V)."""
        cfg, b = self.cfg, self._binding
        B, T = idx.shape
        end = max(cache.starts) + T
        if end > cfg.block_size:
            raise ValueError(f"sequence of {end} tokens exceeds block_size {cfg.block_size}")
        ids = idx.to(torch.int64).contiguous()
        seqlens = torch.tensor([s + T - 1 for s in cache.starts], dtype=torch.int32)  # each row's length - 1
        total = torch.tensor(end, dtype=torch.int32)
        b.bind_input("input_ids", "cpu", 0, np.int64, [B, T], ids.data_ptr())
        b.bind_input("seqlens_k", "cpu", 0, np.int32, [B], seqlens.data_ptr())
        b.bind_input("total_sequence_length", "cpu", 0, np.int32, [], total.data_ptr())
        shape = [B, cfg.n_kv_head, cfg.block_size, cfg.head_dim]
        for i in range(cfg.n_layer):
            for name, buf in (("key", cache.k), ("value", cache.v)):
                ptr = buf[i, cache.row0].data_ptr()  # rows row0.. of layer i: one contiguous block
                b.bind_input(f"past_{name}.{i}", "cpu", 0, np.float32, shape, ptr)
                b.bind_output(f"present_{name}.{i}", "cpu", 0, np.float32, shape, ptr)
        logits = torch.empty(B, cfg.vocab_size)
        b.bind_output("logits", "cpu", 0, np.float32, [B, 1, cfg.vocab_size], logits.data_ptr())
        self.session.run_with_iobinding(b)
        return logits


@torch.no_grad()
def fastest(model: GPT, candidates: list[str], steps: int = 24, rounds: int = 3) -> tuple[str, dict[str, float]]:
    """Of candidates (ORT weights), the one decoding this model fastest here: `steps` one-row decode steps
    after an 8-token prompt, each candidate in turn for `rounds` rounds, medians. Returns (best, tok/s of
    each). A second or two for a small model: serve.weights auto runs it once per model it loads."""
    import statistics
    import time

    from lmops.serve.engine import SlotCache

    decoders = {w: OrtDecoder(model, weights=w) for w in candidates}
    times: dict[str, list[float]] = {w: [] for w in candidates}
    ids = torch.arange(8)[None] % model.cfg.vocab_size
    steps = max(1, min(steps, model.cfg.block_size - 9))
    with torch.no_grad():
        for r in range(rounds + 1):  # round 0 warms each session up
            for w, d in decoders.items():
                cache = SlotCache(model.cfg, 1, torch.device("cpu"), torch.float32)
                cache.select(0, [0])
                d.forward_rows(ids, cache)
                t0 = time.perf_counter()
                for i in range(steps):
                    cache.select(0, [8 + i])
                    d.forward_rows(ids[:, :1], cache)
                if r:
                    times[w].append(steps / (time.perf_counter() - t0))
    speed = {w: statistics.median(v) for w, v in times.items()}
    return max(speed, key=speed.get), speed


@torch.no_grad()
def nll(decoder: OrtDecoder, windows: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats per token) of windows (N, T) under the decode graph, each token
    predicted from those before it, one decode step at a time as serving runs it: what quantized weights
    cost in quality (benchmarks/quantized.py, tests/serve/test_ort.py)."""
    from lmops.serve.engine import SlotCache

    N, T = windows.shape
    cache = SlotCache(decoder.cfg, N, torch.device("cpu"), torch.float32)
    total = 0.0
    for t in range(T - 1):  # all windows advance together: row b at position t
        cache.select(0, [t] * N)
        logits = decoder.forward_rows(windows[:, t:t + 1], cache)
        total += torch.nn.functional.cross_entropy(logits, windows[:, t + 1], reduction="sum").item()
    return total / (N * (T - 1))


def _graph(model: GPT, bits: int | None = None):
    """The ONNX graph of GPT.forward_rows for the last position, and its weights by name (numpy arrays
    sharing the model's memory where the layout allows: a linear's weight.t() is contiguous after
    lmops.serve.engine.prepare). bits 8 or 4: every linear (the output head too) as MatMulNBits over
    quantize's blocks; the embedding stays float32 (a step reads one row of it)."""
    from onnx import TensorProto, helper, numpy_helper

    cfg = model.cfg
    H, KV, D, eps = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.norm_eps
    weights: dict[str, np.ndarray] = {}
    nodes = []

    def weight(name: str, t: torch.Tensor) -> str:
        weights[name] = t.detach().contiguous().numpy()
        return name

    def node(op: str, inputs: list[str], outputs: list[str], **attrs) -> None:
        domain = "com.microsoft" if op in ("GroupQueryAttention", "SkipSimplifiedLayerNormalization",
                                           "MatMulNBits") else ""
        nodes.append(helper.make_node(op, inputs, outputs, domain=domain, **attrs))

    def linear(x: str, name: str, w: torch.Tensor, out: str) -> None:
        """out = x @ w.T, w a linear's weight (N, K): MatMul in float32, MatMulNBits quantized."""
        if bits is None:
            node("MatMul", [x, weight(name, w.t())], [out])
            return
        codes, scales, zeros = quantize(w, bits)
        weights[name + ".q"], weights[name + ".scales"], weights[name + ".zeros"] = codes, scales, zeros
        # accuracy_level 4: the activations too are quantized to int8 per block inside the op, so the
        # products run on int8 dot-product instructions (what makes it faster than float32, not only smaller)
        node("MatMulNBits", [x, name + ".q", name + ".scales", name + ".zeros"], [out], K=w.shape[1], N=w.shape[0],
             bits=bits, block_size=BLOCK, accuracy_level=4)

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, cfg.vocab_size])]
    node("Gather", [weight("embed.weight", model.embed.weight), "input_ids"], ["x.0"])
    cos, sin = weight("rope_cos", model.rope_cos), weight("rope_sin", model.rope_sin)
    x, residual = "x.0", None  # residual: the stream before the last block output was added to it
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        if residual is None:  # first block: nothing to add yet
            node("SimplifiedLayerNormalization", [x, weight(p + "attn_norm.weight", block.attn_norm.weight)], [p + "h"],
                 axis=-1, epsilon=eps, stash_type=1)
            residual = x
        else:  # (attention norm of x + residual) and the sum itself, in one op
            norm = weight(p + "attn_norm.weight", block.attn_norm.weight)
            node("SkipSimplifiedLayerNormalization", [x, residual, norm],
                 [p + "h", "", "", p + "x"], epsilon=eps)
            residual = p + "x"
        linear(p + "h", p + "attn.qkv.weight", block.attn.qkv.weight, p + "qkv")
        cache = []
        for name in ("key", "value"):
            shape = ["batch", KV, cfg.block_size, D]
            inputs.append(helper.make_tensor_value_info(f"past_{name}.{i}", TensorProto.FLOAT, shape))
            outputs.append(helper.make_tensor_value_info(f"present_{name}.{i}", TensorProto.FLOAT, shape))
            cache += [f"past_{name}.{i}"]
        node("GroupQueryAttention", [p + "qkv", "", "", *cache, "seqlens_k", "total_sequence_length", cos, sin],
             [p + "attn", f"present_key.{i}", f"present_value.{i}"], num_heads=H, kv_num_heads=KV, do_rotary=1)
        linear(p + "attn", p + "attn.proj.weight", block.attn.proj.weight, p + "attn_out")
        norm = weight(p + "mlp_norm.weight", block.mlp_norm.weight)
        node("SkipSimplifiedLayerNormalization", [p + "attn_out", residual, norm],
             [p + "h2", "", "", p + "x2"], epsilon=eps)
        residual = p + "x2"
        linear(p + "h2", p + "mlp.gate_up.weight", block.mlp.gate_up.weight, p + "gate_up")
        node("Split", [p + "gate_up"], [p + "gate", p + "up"], axis=-1, num_outputs=2)
        node("Sigmoid", [p + "gate"], [p + "sig"])  # silu(g) = g * sigmoid(g)
        node("Mul", [p + "gate", p + "sig"], [p + "silu"])
        node("Mul", [p + "silu", p + "up"], [p + "gated"])
        linear(p + "gated", p + "mlp.down.weight", block.mlp.down.weight, p + "mlp_out")
        x = p + "mlp_out"
    # only the last position's logits: slice before the final norm and the vocabulary projection
    last = ["last.start", "last.end", "last.axis"]
    constants = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in zip(last, (-1, 2**62, 1))]
    node("Slice", [x, *last], ["x.last"])
    node("Slice", [residual, *last], ["residual.last"])
    norm = weight("norm.weight", model.norm.weight)
    node("SkipSimplifiedLayerNormalization", ["x.last", "residual.last", norm], ["h.last"],
         epsilon=eps)
    linear("h.last", "lm_head.weight", model.lm_head.weight, "logits")

    initializers = constants  # shape inference reads these: stored in the graph
    for name, a in weights.items():  # declared here, data handed to the session in place
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(a.dtype), dims=a.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "lmops-in-memory"), ("offset", "0"), ("length", str(a.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        initializers.append(t)
    graph = helper.make_graph(nodes, "lmops-decode", inputs, outputs, initializers)
    return helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[
        helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]), weights
