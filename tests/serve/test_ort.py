"""The ONNX Runtime forward against GPT.forward_rows: same logits, same cache, step by step."""

from __future__ import annotations

import pytest
import torch

from lmops.serve.engine import SlotCache, prepare
from lmops.serve.ort import OrtDecoder, unsupported
from .test_engine import prompt, tiny

TOL = 1e-4


@pytest.mark.parametrize("arch", [dict(), dict(n_kv_head=4, tie_embeddings=True), dict(n_head=2, n_kv_head=1)],
                         ids=["gqa", "mha-tied", "mqa-head32"])
@torch.inference_mode()
def test_every_kind_of_step_gives_forward_rows_logits_and_cache(arch):
    model = prepare(tiny(**arch))
    decoder = OrtDecoder(model)
    ours, theirs = (SlotCache(model.cfg, 4, torch.device("cpu"), torch.float32) for _ in range(2))

    def step(ids: list[list[int]], row0: int, starts: list[int]) -> None:
        ours.select(row0, starts)
        theirs.select(row0, starts)
        got = decoder.forward_rows(torch.tensor(ids), ours)
        want = model.forward_rows(torch.tensor(ids), theirs)
        assert got.shape == want.shape == (len(ids), model.cfg.vocab_size)
        assert (got - want).abs().max() < TOL
        assert (ours.k - theirs.k).abs().max() < TOL and (ours.v - theirs.v).abs().max() < TOL

    step([prompt(7, 1)], 0, [0])  # a whole prompt into row 0
    step([prompt(5, 2)], 1, [0])  # a prompt in chunks into row 1: first chunk,
    step([prompt(6, 3)], 1, [5])  # then one that continues it
    step([prompt(1, 4)], 2, [0])  # a one-token prompt
    step([[1], [2], [3]], 0, [7, 11, 1])  # one decode step for three rows at three lengths
    step([[4], [5], [6]], 0, [8, 12, 2])
    ours.move(2, 0, 3)  # row 0 leaves, row 2 takes its place (as Engine._leave does)
    theirs.move(2, 0, 3)
    step([[7], [8]], 0, [3, 13])
    step([prompt(48 - 13, 5)], 1, [13])  # up to the last position of the context
    with pytest.raises(ValueError, match="exceeds block_size"):
        step([[9]], 1, [48])


def test_unsupported_names_the_reason():
    assert unsupported(tiny()) is None
    assert "head_dim 8" in unsupported(tiny(d_model=32))
    assert "bfloat16" in unsupported(tiny().to(torch.bfloat16))
    with pytest.raises(ValueError, match="cannot run this model on onnxruntime: head_dim 8"):
        OrtDecoder(tiny(d_model=32))
