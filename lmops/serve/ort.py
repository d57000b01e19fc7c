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


class OrtDecoder:
    """One model's decode graph in an ONNX Runtime session (see the module docstring)."""

    def __init__(self, model: GPT, threads: int | None = None):
        if (reason := unsupported(model)) is not None:
            raise ValueError(f"cannot run this model on onnxruntime: {reason}")
        import onnxruntime as ort

        self.cfg = model.cfg
        graph, weights = _graph(model)
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


def _graph(model: GPT):
    """The ONNX graph of GPT.forward_rows for the last position, and its weights by name (numpy arrays
    sharing the model's memory where the layout allows: a linear's weight.t() is contiguous after
    lmops.serve.engine.prepare)."""
    from onnx import TensorProto, helper, numpy_helper

    cfg = model.cfg
    H, KV, D, eps = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.norm_eps
    weights: dict[str, np.ndarray] = {}
    nodes = []

    def weight(name: str, t: torch.Tensor) -> str:
        weights[name] = t.detach().contiguous().numpy()
        return name

    def node(op: str, inputs: list[str], outputs: list[str], **attrs) -> None:
        domain = "com.microsoft" if op in ("GroupQueryAttention", "SkipSimplifiedLayerNormalization") else ""
        nodes.append(helper.make_node(op, inputs, outputs, domain=domain, **attrs))

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
        node("MatMul", [p + "h", weight(p + "attn.qkv.weight", block.attn.qkv.weight.t())], [p + "qkv"])
        cache = []
        for name in ("key", "value"):
            shape = ["batch", KV, cfg.block_size, D]
            inputs.append(helper.make_tensor_value_info(f"past_{name}.{i}", TensorProto.FLOAT, shape))
            outputs.append(helper.make_tensor_value_info(f"present_{name}.{i}", TensorProto.FLOAT, shape))
            cache += [f"past_{name}.{i}"]
        node("GroupQueryAttention", [p + "qkv", "", "", *cache, "seqlens_k", "total_sequence_length", cos, sin],
             [p + "attn", f"present_key.{i}", f"present_value.{i}"], num_heads=H, kv_num_heads=KV, do_rotary=1)
        node("MatMul", [p + "attn", weight(p + "attn.proj.weight", block.attn.proj.weight.t())], [p + "attn_out"])
        norm = weight(p + "mlp_norm.weight", block.mlp_norm.weight)
        node("SkipSimplifiedLayerNormalization", [p + "attn_out", residual, norm],
             [p + "h2", "", "", p + "x2"], epsilon=eps)
        residual = p + "x2"
        node("MatMul", [p + "h2", weight(p + "mlp.gate_up.weight", block.mlp.gate_up.weight.t())], [p + "gate_up"])
        node("Split", [p + "gate_up"], [p + "gate", p + "up"], axis=-1, num_outputs=2)
        node("Sigmoid", [p + "gate"], [p + "sig"])  # silu(g) = g * sigmoid(g)
        node("Mul", [p + "gate", p + "sig"], [p + "silu"])
        node("Mul", [p + "silu", p + "up"], [p + "gated"])
        node("MatMul", [p + "gated", weight(p + "mlp.down.weight", block.mlp.down.weight.t())], [p + "mlp_out"])
        x = p + "mlp_out"
    # only the last position's logits: slice before the final norm and the vocabulary projection
    last = ["last.start", "last.end", "last.axis"]
    constants = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in zip(last, (-1, 2**62, 1))]
    node("Slice", [x, *last], ["x.last"])
    node("Slice", [residual, *last], ["residual.last"])
    norm = weight("norm.weight", model.norm.weight)
    node("SkipSimplifiedLayerNormalization", ["x.last", "residual.last", norm], ["h.last"],
         epsilon=eps)
    node("MatMul", ["h.last", weight("lm_head.weight", model.lm_head.weight.t())], ["logits"])

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
