"""Fixtures for the monitor tests: a workspace whose corpus is ingested (a dataset version with a
validation split), a model that knows that corpus, and traffic like it or unlike it.

The model is built, not trained: a character bigram language model estimated from the training split
(add-one smoothed), written as a GPT whose blocks pass the residual through unchanged (their output
projections zero), whose embeddings are one-hot and whose output layer holds log P(next | current).
Its loss on text like the corpus is low, on other text high, as a trained model's is, in no time.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from lmops.checkpoint import save_checkpoint
from lmops.config import override
from lmops.data.dataset import iter_documents, load_dataset
from lmops.data.demo import demo_corpus
from lmops.model import GPT, GPTConfig
from lmops.tokenizer import load_tokenizer, save_tokenizer
from lmops.workspace import init_workspace

SETTINGS = ["tokenizer.kind=char", "monitor.sample=64", "monitor.min_requests=20", "monitor.reference_size=600"]

LATIN = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et "
         "dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris nisi aliquip ex ea "
         "commodo consequat duis aute irure reprehenderit voluptate velit esse cillum fugiat nulla pariatur "
         "excepteur sint occaecat cupidatat non proident sunt culpa qui officia deserunt mollit anim id est "
         "laborum").split()


def bigram_model(tok, text: str) -> GPT:
    vocab = tok.get_vocab_size()
    d = -(-vocab // 4) * 4  # two heads of an even size (RoPE rotates pairs)
    cfg = GPTConfig(vocab_size=vocab, n_layer=1, n_head=2, n_kv_head=2, d_model=d, mlp_hidden=2 * d, block_size=256,
                    rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False)
    model = GPT(cfg)
    counts = torch.ones(vocab, vocab)
    ids = tok.encode(text, add_special_tokens=False).ids
    for a, b in zip(ids, ids[1:]):
        counts[a, b] += 1
    logp = (counts / counts.sum(1, keepdim=True)).log()  # [current, next]
    with torch.no_grad():
        model.embed.weight.zero_()
        model.embed.weight[:, :vocab] = torch.eye(vocab)
        for block in model.blocks:
            block.attn.proj.weight.zero_()
            block.mlp.down.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, :vocab] = logp.T / math.sqrt(d)  # RMSNorm scales a one-hot row to sqrt(d)
    return model.eval()


def heldout_lines(ws, dataset_id: str) -> list[str]:
    """The validation split's lines in a random order: traffic like the corpus is a sample of it, not one
    section of it (a window of one section is a shift of topic, which the monitor rightly notices)."""
    version = load_dataset(ws.state, dataset_id)
    lines = [ln.strip() for _, t in iter_documents(version, "val") for ln in t.splitlines() if ln.strip()]
    random.Random(0).shuffle(lines)
    return lines


RUSSIAN = ("мы говорим о погоде и о том что будет завтра в городе много людей которые работают каждый день "
           "книга лежит на столе рядом с окном дети играют во дворе после школы").split()


def russian_lines(n: int, seed: int = 0) -> list[str]:
    """Another language in another script: characters the corpus's tokenizer has never seen."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(RUSSIAN) for _ in range(rng.randint(4, 14))).capitalize() + "." for _ in range(n)]


def latin_lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(LATIN) for _ in range(rng.randint(4, 14))).capitalize() + "." for _ in range(n)]


@pytest.fixture(scope="session")
def corpus_model(tmp_path_factory):
    """(workspace, config, dataset id, model folder): the demo corpus ingested and tokenized, its bigram
    model saved as a checkpoint with the corpus's tokenizer."""
    from lmops.pipeline import prepare_data

    root = tmp_path_factory.mktemp("monitor")
    ws = init_workspace(root / "ws")
    (ws.root / "corpus" / "docs.txt").write_text(demo_corpus()[:200_000], encoding="utf-8")
    cfg = override(ws.config(), SETTINGS)
    out = prepare_data(ws, cfg, log=lambda m: None)
    tok = load_tokenizer(Path(out["tokenizer_dir"]))
    version = load_dataset(ws.state, out["dataset"])
    train_text = "\n".join(t for _, t in iter_documents(version, "train"))
    folder = root / "model"
    save_tokenizer(tok, folder)
    save_checkpoint(folder / "ckpt.safetensors", bigram_model(tok, train_text), meta={"step": 0})
    return ws, cfg, out["dataset"], folder
