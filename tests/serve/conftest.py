"""Fixtures for the server tests: a tiny model whose output is known, and live servers on loopback.

The model is built, not trained (training takes seconds we do not have): a char tokenizer and a GPT
whose embeddings are one-hot and whose output layer puts a margin on one chosen next character, so
greedy decoding follows a table (`NEXT`) and sampling still varies. The blocks keep small random
weights, so the logits also depend on the context (a wrong position would show in the logprobs).

- "quick frog," is a cycle: a prompt of ordinary text soon continues "quick frog,quick frog,...".
- "hal@twe.yz;" is a cycle too: a prompt ending in one of its characters writes e-mail addresses,
  which moderation redacts.
- "!" is followed by end-of-text: the completion ends at once with finish_reason "stop".
"""

from __future__ import annotations

import socket
import sys
import string
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from lmops.checkpoint import save_checkpoint
from lmops.config import override
from lmops.model import GPT, GPTConfig
from lmops.serve.app import create_app
from lmops.serve.source import ModelSource
from lmops.store import Store
from lmops.tokenizer import EOT, save_tokenizer, train_tokenizer
from lmops.workspace import init_workspace

WORDS = "quick frog,"
EMAIL = "hal@twe.yz;"
ALPHABET = string.ascii_letters + " .,;:!?@[]\n'-é"
MARGIN = 6.0  # logit margin of the chosen next character: greedy follows NEXT, temperature 1 mostly does


def alphabet_tokenizer():
    return train_tokenizer([ALPHABET], "char")


def next_table(tok) -> dict[int, int]:
    """Token id -> the id greedy decoding writes after it."""
    ids = {c: tok.token_to_id(c) for c in ALPHABET}
    table = {i: ids["q"] for i in ids.values()}
    for cycle in (WORDS, EMAIL):
        for a, b in zip(cycle, cycle[1:] + cycle[0]):
            table[ids[a]] = ids[b]
    table[ids["!"]] = tok.token_to_id(EOT)
    table[tok.token_to_id(EOT)] = ids["q"]
    return table


def table_model(tok, seed: int = 0, block_size: int = 512) -> GPT:
    V = tok.get_vocab_size()
    cfg = GPTConfig(vocab_size=V, n_layer=2, n_head=2, n_kv_head=2, d_model=96, mlp_hidden=128, block_size=block_size,
                    rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False)
    assert V <= cfg.d_model
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.embed.weight.zero_()
        model.embed.weight[:, :V] = torch.eye(V)
        head = 0.05 * torch.randn(V, cfg.d_model)  # about 0.5 of logit noise against the margin
        for a, b in next_table(tok).items():
            head[b, a] += MARGIN / cfg.d_model ** 0.5  # RMSNorm scales a one-hot vector by sqrt(d_model)
        model.lm_head.weight.copy_(head)
    return model


def save_model(folder: Path, model: GPT, tok) -> Path:
    save_tokenizer(tok, folder)
    return save_checkpoint(folder / "ckpt.safetensors", model, meta={"step": 0})


class LiveServer:
    """An app served by uvicorn on 127.0.0.1 in a background thread, as `lmops serve` would serve it."""

    def __init__(self, app, shutdown_timeout_s: float = 10.0, ready: bool = True):
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=shutdown_timeout_s)
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while True:  # until ready (or, with ready False, until it answers at all)
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200 or not ready:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not become ready")
            time.sleep(0.02)

    @property
    def server(self):
        return self.app.state.server

    @contextmanager
    def slow_model(self, seconds_per_step: float = 0.002):
        """Each forward of the served model takes at least this long, as a larger model's would: long
        enough that a test can act while a request is still generating."""
        engine = self.server.engine
        fast = engine._forward  # the runtime's forward, whichever runs it

        def slow(idx, cache):
            time.sleep(seconds_per_step)
            return fast(idx, cache)

        engine._forward = slow
        try:
            yield
        finally:
            engine._forward = fast

    def shutdown(self) -> None:
        """What SIGTERM does: stop accepting, let in-flight requests finish, run the app's shutdown."""
        self.uvicorn.should_exit = True

    def stop(self) -> None:
        self.shutdown()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the test server did not stop"


@pytest.fixture(scope="session")
def tok():
    return alphabet_tokenizer()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tok) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny"
    save_model(folder, table_model(tok), tok)
    return folder


class Env:
    """A workspace with its store and three API keys, and a way to start servers on it."""

    def __init__(self, root: Path, model_dir: Path):
        self.ws = init_workspace(root)
        self.model_dir = model_dir
        self.store = Store.for_workspace(self.ws)
        self.keys = {role: self.store.keys.create(f"test-{role}", role, "tests")[1]
                     for role in ("inference", "deployer", "admin")}
        self.servers: list[LiveServer] = []

    def config(self, *sets: str):
        return override(self.ws.config(), ["serve.moderation_holdback_chars=16", *sets])

    def key(self, role: str = "inference", name: str | None = None) -> str:
        if name is None:
            return self.keys[role]
        return self.store.keys.create(name, role, "tests")[1]

    def start(self, *sets: str, source=None, shutdown_timeout_s: float = 10.0, ready: bool = True,
              **features) -> LiveServer:
        """A live server of the tiny model (or of source) with config overrides and features switched."""
        cfg = self.config(*sets)
        source = source or ModelSource(self.ws, cfg, str(self.model_dir))
        live = LiveServer(create_app(cfg, source, self.store, **features), shutdown_timeout_s, ready)
        self.servers.append(live)
        return live

    def close(self) -> None:
        for live in self.servers:
            if live.thread.is_alive():
                live.stop()
        self.store.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory, model_dir):
    e = Env(tmp_path_factory.mktemp("serve") / "ws", model_dir)
    yield e
    e.close()


def free_port() -> int:
    """A port of 127.0.0.1 nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# lmops.serve.app.serve, as `lmops serve` calls it, in a process of its own: WS MODEL PORT [--set items]
SERVE = ("import sys; from lmops.config import override; from lmops.serve.app import serve; "
         "from lmops.workspace import Workspace; ws = Workspace(__import__('pathlib').Path(sys.argv[1])); "
         "serve(ws, override(ws.config(), sys.argv[4:]), sys.argv[2], '127.0.0.1', int(sys.argv[3]))")


def serve_command(ws_root, model, port: int, *sets: str) -> list[str]:
    """The command line of a server process for model on port, with section.key=value overrides."""
    return [sys.executable, "-c", SERVE, str(ws_root), str(model), str(port), *sets]


def wait_ready(proc, url: str, timeout: float = 60.0) -> None:
    """Until the server process at url answers /readyz with 200; fails with its stderr if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, f"the server exited ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() < deadline, f"{url} not ready after {timeout:.0f} s"
        time.sleep(0.1)
