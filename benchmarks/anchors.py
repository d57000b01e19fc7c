"""Shared by vs_llamacpp.py and vs_llama_server.py: finding the llama.cpp anchor, the benchmark models, GGUF files.

Nothing here installs anything. The anchor is what benchmarks/setup_anchors.sh builds, found through:

  LMOPS_ANCHORS   its prefix (default /work/anchors): bin/llama-server, lib/libllama.so, venv/ (llama-cpp-python),
                  llama.cpp/ (the vendored source: convert_hf_to_gguf.py, gguf-py)
  LLAMA_CPP_DIR   a llama.cpp source tree, for convert_hf_to_gguf.py (overrides the prefix's)
  LLAMA_SERVER    the llama-server binary (else the prefix's bin/, else llama-server on PATH)
  LLAMA_CPP_PYTHON a python with llama_cpp importable (else the prefix's venv/bin/python)
  LLAMA_CPP_LIB_PATH the folder of libllama.so for that python (else the prefix's lib/, when it exists)

This file also runs as two helper processes (standard library only at import, so either python can run it):

  python anchors.py --convert HF_DIR OUTTYPE OUTFILE   convert_hf_to_gguf.py with two patches (below); run by the
                                                       project's python, which has the torch and transformers
                                                       the converter imports
  python anchors.py --worker                            llama.cpp's decode loop, driven over stdin/stdout (JSON
                                                       lines); run by the anchor's python, in its own venv

The two converter patches, for a random model with a tokenizer trained here: the vocabulary is read as GPT-2
byte-level BPE (convert_hf_to_gguf's Llama path tries sentencepiece first and needs the sentencepiece package
to find out there is no tokenizer.model), and the pre-tokenizer is named "gpt-2" (the converter recognises
pre-tokenizers by the hash of known models' token ids, which a freshly trained vocabulary cannot match; lmops's
byte-level BPE splits with GPT-2's regex, which is llama.cpp's "gpt-2").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PREFIX = Path(os.environ.get("LMOPS_ANCHORS", "/work/anchors"))
HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- finding the anchor

def llama_cpp_dir() -> Path | None:
    """The llama.cpp source tree holding convert_hf_to_gguf.py, or None."""
    for d in (os.environ.get("LLAMA_CPP_DIR"), PREFIX / "llama.cpp"):
        if d and (Path(d) / "convert_hf_to_gguf.py").is_file():
            return Path(d)
    return None


def llama_server() -> Path | None:
    for p in (os.environ.get("LLAMA_SERVER"), PREFIX / "bin" / "llama-server", shutil.which("llama-server")):
        if p and Path(p).is_file() and os.access(p, os.X_OK):
            return Path(p)
    return None


def llama_bench() -> Path | None:
    server = llama_server()
    for p in ((server.parent / "llama-bench") if server else None, shutil.which("llama-bench")):
        if p and Path(p).is_file():
            return Path(p)
    return None


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    if "LLAMA_CPP_LIB_PATH" not in env and (PREFIX / "lib" / "libllama.so").exists():
        env["LLAMA_CPP_LIB_PATH"] = str(PREFIX / "lib")
    return env


def llama_cpp_python() -> tuple[Path | None, str]:
    """(a python that imports llama_cpp, "") or (None, why not)."""
    candidates = [os.environ.get("LLAMA_CPP_PYTHON"), PREFIX / "venv" / "bin" / "python", sys.executable]
    for py in candidates:
        if not py or not Path(py).exists():
            continue
        r = subprocess.run([str(py), "-c", "import llama_cpp"], env=worker_env(), capture_output=True, text=True)
        if r.returncode == 0:
            return Path(py), ""
    return None, ("no python with llama_cpp (llama-cpp-python) found: tried LLAMA_CPP_PYTHON, "
                  f"{PREFIX}/venv/bin/python and this python")


def missing(*, convert: bool = False, python: bool = False, server: bool = False) -> str | None:
    """Why the anchor cannot run (None: it can). For the benchmarks' skip message."""
    why = []
    if convert and llama_cpp_dir() is None:
        why.append(f"no convert_hf_to_gguf.py (set LLAMA_CPP_DIR, or LMOPS_ANCHORS with llama.cpp/ in it; "
                   f"looked in {PREFIX}/llama.cpp)")
    if server and llama_server() is None:
        why.append(f"no llama-server (set LLAMA_SERVER, put it on PATH, or build it into {PREFIX}/bin)")
    if python:
        py, reason = llama_cpp_python()
        if py is None:
            why.append(reason)
    if why:
        return "; ".join(why) + ". Install with: bash benchmarks/setup_anchors.sh"
    return None


def lmops_version() -> str:
    """Which lmops is measured: its folder, commit, and whether its files differ from that commit."""
    import lmops

    root = Path(lmops.__file__).resolve().parent
    git = ["git", "-C", str(root.parent)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if not commit and (root.parent / "COMMIT").is_file():  # an export (git archive HEAD lmops) with its commit
        return f"lmops {(root.parent / 'COMMIT').read_text().strip()} (exported to {root})"
    dirty = subprocess.run([*git, "status", "--porcelain", "--", str(root)], capture_output=True, text=True).stdout
    changed = [line[3:] for line in dirty.splitlines()]
    return (f"lmops {commit or '(no git)'} at {root}"
            + (f", with uncommitted changes to {len(changed)} files ({', '.join(changed[:6])}"
               f"{', ...' if len(changed) > 6 else ''})" if changed else ""))


# ----------------------------------------------------------------------------- the benchmark models

SIZES = {  # layers x width, vocab: issue 14's three sizes; head_dim 64, SwiGLU hidden ~8/3 width
    "4x256": dict(n_layer=4, d_model=256, n_head=4, mlp_hidden=704, vocab_size=4096),
    "6x384": dict(n_layer=6, d_model=384, n_head=6, mlp_hidden=1024, vocab_size=8192),
    "12x768": dict(n_layer=12, d_model=768, n_head=12, mlp_hidden=2048, vocab_size=32000),
}
BLOCK_SIZE = 512


def tokenizer_corpus(chars: int = 16_000_000) -> list[str]:
    """Text to train the byte-level BPE on: lmops's demo corpus, then Python's standard library sources (sorted,
    site-packages left out), enough for 32,000 tokens (the demo corpus alone gives ~6,700). Only the tokenizer
    depends on it (the weights are random), and only the server benchmark's text prompts use the tokenizer."""
    from lmops.data.demo import demo_corpus

    texts, n = [demo_corpus()], 0
    for path in sorted(Path(os.__file__).parent.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        t = path.read_text(encoding="utf-8", errors="replace")
        texts.append(t)
        n += len(t)
        if n >= chars:
            break
    return texts


def build_hf(size: str, root: Path) -> Path:
    """A random lmops GPT of this size, exported with lmops.hf.export_hf with a byte-level BPE trained here; cached
    in root/size/hf. Seed 0; embeddings N(0, 1) and every other matrix N(0, 4 / fan_in) (gain 2): at lmops's own
    init (0.02) or gain 1 the residual stream is the current token's embedding and greedy decoding repeats the
    prompt's last token forever (the same token on both sides proves nothing); at gain 2 a 256-token greedy
    continuation holds ~230 distinct tokens. Speed does not depend on the values."""
    out = root / size / "hf"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    import math

    import torch

    from lmops.hf import export_hf
    from lmops.model import GPT, GPTConfig
    from lmops.tokenizer import save_tokenizer, train_tokenizer

    s = SIZES[size]
    tok_dir = root / size / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        tok = train_tokenizer(tokenizer_corpus(), "bpe", vocab_size=s["vocab_size"])
        if tok.get_vocab_size() != s["vocab_size"]:
            raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {s['vocab_size']}")
        save_tokenizer(tok, tok_dir)
    cfg = GPTConfig(vocab_size=s["vocab_size"], n_layer=s["n_layer"], n_head=s["n_head"], n_kv_head=s["n_head"],
                    d_model=s["d_model"], mlp_hidden=s["mlp_hidden"], block_size=BLOCK_SIZE, rope_theta=10000.0,
                    norm_eps=1e-5, tie_embeddings=True)
    torch.manual_seed(0)
    m = GPT(cfg)
    with torch.no_grad():
        m.embed.weight.normal_(0, 1.0)
        for name, p in m.named_parameters():
            if p.dim() == 2 and p is not m.embed.weight and p is not m.lm_head.weight:
                p.normal_(0, 2.0 / math.sqrt(p.shape[1]))
    return export_hf(m.eval(), out, tok_dir, overwrite=True)


def gguf(hf_dir: Path, outtype: str) -> Path:
    """hf_dir converted by llama.cpp's convert_hf_to_gguf.py to outtype (f32, f16, q8_0), beside it; cached."""
    out = hf_dir.parent / f"model-{outtype}.gguf"
    if out.is_file():
        return out
    src = llama_cpp_dir()
    if src is None:
        raise RuntimeError(missing(convert=True))
    tmp = out.with_suffix(".tmp")
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--convert", str(hf_dir), outtype, str(tmp)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf failed for {hf_dir} {outtype}:\n{r.stderr[-3000:]}")
    tmp.rename(out)
    return out


def gguf_tensor_bytes(path: Path) -> int:
    """Bytes of all tensors in a GGUF file (what one decoded token reads when the embedding is tied: the output
    projection reads the whole embedding matrix)."""
    src = llama_cpp_dir()
    if src is not None and str(src / "gguf-py") not in sys.path:
        sys.path.insert(1, str(src / "gguf-py"))
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


# ----------------------------------------------------------------------------- the llama.cpp worker (driven from here)

class LlamaCppWorker:
    """A process of the anchor's python holding llama.cpp models, running greedy decodes on request."""

    def __init__(self) -> None:
        py, reason = llama_cpp_python()
        if py is None:
            raise RuntimeError(reason)
        self.proc = subprocess.Popen([str(py), "-X", "faulthandler", str(Path(__file__).resolve()), "--worker"], env=worker_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info = self.call({"cmd": "info"})

    def call(self, msg: dict) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"llama.cpp worker died (exit {self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"llama.cpp worker: {reply['error']}")
        return reply

    def load(self, key: str, path: Path, threads: int, n_ctx: int = BLOCK_SIZE) -> None:
        self.call({"cmd": "load", "key": key, "path": str(path), "threads": threads, "n_ctx": n_ctx})

    def unload(self, key: str) -> None:
        self.call({"cmd": "unload", "key": key})

    def decode(self, key: str, prompt: list[int], n: int) -> tuple[list[int], float, float]:
        """Greedy: (tokens, seconds to the first token, seconds from the first token to the last)."""
        r = self.call({"cmd": "decode", "key": key, "prompt": prompt, "n": n})
        return r["tokens"], r["t_first"], r["t_rest"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(30)


def _worker() -> None:
    """The decode loop in C as far as llama-cpp-python's low-level API goes: per token one llama_decode of a
    one-token batch and one llama_sampler_sample (greedy, over the last logits, in C); the Python between them
    is a few calls through ctypes. Timed from the first sampled token to the last."""
    import ctypes

    import llama_cpp as L

    L.llama_backend_init()
    quiet = L.llama_log_callback(lambda level, text, data: None)  # kept referenced: llama.cpp calls it later
    L.llama_log_set(quiet, ctypes.c_void_p(0))
    models: dict[str, tuple] = {}

    def reply(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["cmd"] == "info":
                reply({"version": L.__version__, "system_info": L.llama_print_system_info().decode()})
            elif msg["cmd"] == "load":
                mp = L.llama_model_default_params()
                model = L.llama_model_load_from_file(msg["path"].encode(), mp)
                if not model:
                    raise RuntimeError(f"cannot load {msg['path']}")
                cp = L.llama_context_default_params()
                cp.n_ctx = cp.n_batch = cp.n_ubatch = msg["n_ctx"]
                cp.n_seq_max = 1
                cp.n_threads = cp.n_threads_batch = msg["threads"]
                ctx = L.llama_init_from_model(model, cp)
                if not ctx:
                    raise RuntimeError("cannot create a context")
                smpl = L.llama_sampler_init_greedy()
                models[msg["key"]] = (model, ctx, smpl)
                reply({"ok": True})
            elif msg["cmd"] == "unload":
                model, ctx, smpl = models.pop(msg["key"])
                L.llama_sampler_free(smpl)
                L.llama_free(ctx)
                L.llama_model_free(model)
                reply({"ok": True})
            elif msg["cmd"] == "decode":
                model, ctx, smpl = models[msg["key"]]
                L.llama_memory_clear(L.llama_get_memory(ctx), True)
                L.llama_sampler_reset(smpl)
                prompt, n = msg["prompt"], msg["n"]
                tok = (L.llama_token * len(prompt))(*prompt)
                one = (L.llama_token * 1)()
                out = []
                start = time.perf_counter()
                if L.llama_decode(ctx, L.llama_batch_get_one(tok, len(prompt))) != 0:
                    raise RuntimeError("llama_decode failed on the prompt")
                t = L.llama_sampler_sample(smpl, ctx, -1)
                first = time.perf_counter()
                out.append(t)
                for _ in range(n - 1):
                    one[0] = t
                    if L.llama_decode(ctx, L.llama_batch_get_one(one, 1)) != 0:
                        raise RuntimeError("llama_decode failed")
                    t = L.llama_sampler_sample(smpl, ctx, -1)
                    out.append(t)
                end = time.perf_counter()
                reply({"tokens": out, "t_first": first - start, "t_rest": end - first})
            else:
                raise ValueError(f"unknown command {msg['cmd']!r}")
        except Exception as err:  # reported to the driver, which raises
            reply({"error": f"{type(err).__name__}: {err}"})


def _convert(hf_dir: str, outtype: str, outfile: str) -> None:
    src = llama_cpp_dir()
    sys.path.insert(0, str(src))
    sys.path.insert(1, str(src / "gguf-py"))  # as the converter itself does, before its package imports gguf
    sys.argv = ["convert_hf_to_gguf.py", hf_dir, "--outtype", outtype, "--outfile", outfile]
    import runpy

    import conversion  # noqa: F401  (the converter's package, beside it)
    from conversion.base import TextModel

    def no_sentencepiece(self, *a, **k):
        raise FileNotFoundError("no tokenizer.model: byte-level BPE")

    TextModel._set_vocab_sentencepiece = no_sentencepiece
    TextModel._set_vocab_llama_hf = no_sentencepiece
    TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    runpy.run_path(str(src / "convert_hf_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker()
    elif sys.argv[1:2] == ["--convert"] and len(sys.argv) == 5:
        _convert(*sys.argv[2:])
    else:
        sys.exit(__doc__)
