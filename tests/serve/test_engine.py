"""The inference engine against naive full-recompute generation from the same model."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
import torch.nn.functional as F

from lmops.model import GPT, GPTConfig
from lmops.serve.engine import Engine, EngineStats, EngineStopped, QueueFull, SamplingParams

V = 97
TOL = 1e-4


def tiny(seed: int = 0, **kw) -> GPT:
    """Unit-scale random weights, so logits spread over several nats and a wrong position shows.
    head_dim 16: the smallest ONNX Runtime's fused attention takes, so the default runtime is onnxruntime."""
    cfg = dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=64, mlp_hidden=64, block_size=48,
               rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                std = {"embed.weight": 1.0, "lm_head.weight": 2 * p.shape[1] ** -0.5}.get(name, p.shape[1] ** -0.5)
                p.normal_(0, std)
    return model


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def naive(model: GPT, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy, recomputing the whole sequence for every token: tokens and their log_softmax rows."""
    ids, out, rows = list(ids), [], []
    for _ in range(n):
        logprobs = F.log_softmax(model(torch.tensor([ids]))[0, -1], dim=-1)
        out.append(int(logprobs.argmax()))
        rows.append(logprobs)
        ids.append(out[-1])
    return out, rows


def check_greedy(model: GPT, handle, events) -> None:
    ref, rows = naive(model, handle.prompt_ids, len(events))
    assert [e.token_id for e in events] == ref
    for e, row in zip(events, rows):
        assert abs(e.logprob - row[e.token_id].item()) < TOL
        values, ids = row.topk(3)
        assert list(e.top_logprobs) == ids.tolist()
        assert torch.allclose(torch.tensor(list(e.top_logprobs.values())), values, atol=TOL)


@pytest.fixture(params=["onnxruntime", "torch"])
def runtime(request) -> str:
    """The engine's two runtimes for its forward: each must give naive recompute's tokens and logits."""
    return request.param


def test_model_is_meaningful():
    model = tiny()
    logits = model(torch.tensor([prompt(10, 0)]))
    assert logits.std() > 1.0  # token choices are not ties


@pytest.mark.parametrize("arch", [dict(), dict(n_kv_head=4, tie_embeddings=True)], ids=["gqa", "mha-tied"])
def test_greedy_alone_equals_naive_recompute(arch, runtime):
    model = tiny(**arch)
    engine = Engine(model, runtime=runtime).start()
    assert engine.runtime == runtime
    h = engine.submit(prompt(7, 1), SamplingParams(max_tokens=20, temperature=0, logprobs=3))
    events = list(h)
    engine.stop(1)
    assert len(events) == 20 and h.finish_reason == "length"
    check_greedy(model, h, events)
    assert h.prompt_tokens == 7 and h.completion_tokens == 20
    assert h.queued_at <= h.started_at <= h.first_token_at <= h.finished_at


def test_mixed_batch_joining_mid_decode_equals_naive(runtime):
    """Different prompt lengths joining at different steps, one prompt prefilled in chunks, rows leaving."""
    model = tiny()
    engine = Engine(model, max_batch=4, prefill_chunk=8, runtime=runtime)
    greedy = dict(temperature=0, logprobs=3)
    a = engine.submit(prompt(5, 1), SamplingParams(max_tokens=30, **greedy))
    for _ in range(4):
        engine.step()
    b = engine.submit(prompt(19, 2), SamplingParams(max_tokens=12, **greedy))  # 3 chunks of prefill
    c = engine.submit(prompt(2, 3), SamplingParams(max_tokens=25, **greedy))
    engine.step()
    assert engine.stats().running == 2  # a decoding, b prefilling
    for _ in range(3):
        engine.step()
    assert engine.stats().running == 3
    for _ in range(6):
        engine.step()
    d = engine.submit(prompt(11, 4), SamplingParams(max_tokens=40, **greedy))  # reaches block_size 48
    while engine.stats().running or engine.stats().waiting:
        engine.step()
    for h in (a, b, c, d):
        events = list(h)
        check_greedy(model, h, events)
    assert [h.completion_tokens for h in (a, b, c, d)] == [30, 12, 25, 48 - 11]
    assert d.finish_reason == "length"


def test_greedy_in_threaded_batch_equals_naive(runtime):
    model = tiny()
    engine = Engine(model, max_batch=3, runtime=runtime).start()
    handles = []
    for i, n in enumerate([3, 9, 1, 14, 6]):
        handles.append(engine.submit(prompt(n, 10 + i), SamplingParams(max_tokens=15 + i, temperature=0, logprobs=3)))
    for h in handles:
        check_greedy(model, h, list(h))
    engine.stop(1)


def sampled(engine: Engine, ids: list[int], seed: int) -> list[int]:
    return [e.token_id for e in engine.submit(ids, SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95,
                                                                 seed=seed))]


def test_seed_gives_same_tokens_alone_and_in_a_busy_batch(runtime):
    model = tiny()
    engine = Engine(model, max_batch=4, runtime=runtime).start()
    ids = prompt(6, 5)
    alone = sampled(engine, ids, seed=42)
    others = [engine.submit(prompt(3 + i, 20 + i), SamplingParams(max_tokens=40, temperature=1.0, seed=i))
              for i in range(3)]
    next(iter(others[0]))  # the others are decoding when ours joins
    busy = sampled(engine, ids, seed=42)
    for h in others:
        list(h)
    other_seed = sampled(engine, ids, seed=43)
    engine.stop(1)
    assert alone == busy
    assert alone != other_seed


def test_top_k_1_is_greedy():
    model = tiny()
    engine = Engine(model).start()
    ids = prompt(4, 7)
    greedy = [e.token_id for e in engine.submit(ids, SamplingParams(max_tokens=15, temperature=0))]
    top1 = [e.token_id for e in engine.submit(ids, SamplingParams(max_tokens=15, temperature=1.5, top_k=1, seed=3))]
    engine.stop(1)
    assert top1 == greedy


def test_sampled_logprobs_are_the_models():
    model = tiny()
    engine = Engine(model).start()
    h = engine.submit(prompt(4, 8), SamplingParams(max_tokens=10, temperature=1.0, seed=1, logprobs=0))
    events = list(h)
    engine.stop(1)
    ids = h.prompt_ids + [e.token_id for e in events]
    with torch.no_grad():
        ref = F.log_softmax(model(torch.tensor([ids]))[0], dim=-1)
    for i, e in enumerate(events):
        assert e.top_logprobs is None
        assert abs(e.logprob - ref[len(h.prompt_ids) - 1 + i, e.token_id].item()) < TOL


def test_stop_token_and_max_tokens():
    model = tiny()
    engine = Engine(model).start()
    ids = prompt(5, 9)
    ref, _ = naive(model, ids, 6)
    stop = ref[3]
    expected = ref[:ref.index(stop)]
    h = engine.submit(ids, SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop]))
    assert [e.token_id for e in h] == expected and h.finish_reason == "stop"
    h = engine.submit(ids, SamplingParams(max_tokens=4, temperature=0))
    assert [e.token_id for e in h] == ref[:4] and h.finish_reason == "length"
    h = engine.submit(ids, SamplingParams(max_tokens=0))
    assert list(h) == [] and h.finish_reason == "length" and h.completion_tokens == 0
    engine.stop(1)


def test_prompt_at_block_size_finishes_with_length_and_too_long_is_refused():
    model = tiny()
    engine = Engine(model).start()
    h = engine.submit(prompt(48, 1), SamplingParams(max_tokens=5))
    assert list(h) == [] and h.finish_reason == "length"
    with pytest.raises(ValueError, match="context"):
        engine.submit(prompt(49, 1))
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([V])
    engine.stop(1)


def test_cancel_frees_the_slot_for_a_waiting_request():
    engine = Engine(tiny(), max_batch=1)
    long = engine.submit(prompt(3, 1), SamplingParams(max_tokens=40, temperature=0))
    waiting = engine.submit(prompt(3, 2), SamplingParams(max_tokens=3, temperature=0))
    for _ in range(3):
        engine.step()
    assert engine.stats().running == 1 and engine.stats().waiting == 1
    long.cancel()
    engine.step()
    assert long.finish_reason == "cancelled" and long.completion_tokens == 4  # prefill + 3 decode steps
    assert engine.stats().running == 1 and engine.stats().waiting == 0
    while not waiting.done:
        engine.step()
    assert waiting.finish_reason == "length" and len(list(waiting)) == 3
    gone = engine.submit(prompt(3, 3))
    gone.cancel()  # a waiting request is cancelled at once
    assert gone.finish_reason == "cancelled" and engine.stats().waiting == 0


def test_queue_full():
    engine = Engine(tiny(), max_batch=2, max_waiting=2)
    for ids in ([1, 2], [3], [4], [5]):  # two take the free rows at the next step, two wait
        engine.submit(ids)
    with pytest.raises(QueueFull):
        engine.submit([6])
    engine.step()
    assert engine.stats() == EngineStats(running=2, waiting=2)
    with pytest.raises(QueueFull):
        engine.submit([6])


def test_score_matches_log_softmax_while_decoding():
    model = tiny()
    engine = Engine(model).start()
    busy = engine.submit(prompt(3, 1), SamplingParams(max_tokens=40, temperature=0))
    ids = prompt(20, 2)
    scored = engine.score(ids, top_n=2)
    engine.stop(5)
    assert busy.finish_reason == "length"
    with torch.no_grad():
        ref = F.log_softmax(model(torch.tensor([ids]))[0], dim=-1)
    assert scored[0] == (None, None) and len(scored) == 20
    for t in range(1, 20):
        logprob, top = scored[t]
        assert abs(logprob - ref[t - 1, ids[t]].item()) < TOL
        assert list(top) == ref[t - 1].topk(2).indices.tolist()


def test_stop_drains_then_cancels():
    engine = Engine(tiny(), max_batch=2).start()
    handles = [engine.submit(prompt(4, i), SamplingParams(max_tokens=20, temperature=0)) for i in range(3)]
    engine.stop(drain_timeout=30)
    assert [h.finish_reason for h in handles] == ["length"] * 3  # the waiting one was accepted: it ran too
    with pytest.raises(EngineStopped):
        engine.submit([1])

    engine = Engine(tiny(block_size=2048), max_batch=1).start()
    handles = [engine.submit(prompt(4, i), SamplingParams(max_tokens=2000, temperature=0)) for i in range(2)]
    engine.stop(drain_timeout=0.05)
    assert [h.finish_reason for h in handles] == ["cancelled"] * 2


def test_async_streaming_and_task_cancellation():
    model = tiny(block_size=1024)
    engine = Engine(model).start()
    forwards, held = 0, threading.Event()
    real = engine._forward

    def gated(idx, cache):  # after the prefill and one decode step, the engine waits for the test
        nonlocal forwards
        forwards += 1
        if forwards > 3:
            assert held.wait(30)
        return real(idx, cache)

    async def main():
        h = engine.submit(prompt(5, 1), SamplingParams(max_tokens=10, temperature=0, logprobs=3))
        events = [e async for e in h]
        check_greedy(model, h, events)
        nonlocal forwards
        forwards = 1  # the slow request's prefill is the next forward
        engine._forward = gated
        slow = engine.submit(prompt(5, 2), SamplingParams(max_tokens=1000, temperature=0))
        first = asyncio.Event()

        async def read():  # waits in the handle for each token, where the cancellation lands
            async for _ in slow:
                first.set()

        task = asyncio.create_task(read())
        await asyncio.wait_for(first.wait(), 30)
        task.cancel()  # the client disconnected
        await asyncio.gather(task, return_exceptions=True)
        held.set()  # the step under way ends with one more token; the next one drops the request
        assert await asyncio.to_thread(slow.wait, 30)
        return slow

    slow = asyncio.run(main())
    engine.stop(1)
    # prefill's token, one decode step's, and the one of the step the cancellation arrived during
    assert slow.finish_reason == "cancelled" and 1 <= slow.completion_tokens <= 3


def test_a_step_wakes_each_event_loop_once_and_a_late_reader_catches_up_in_one_batch():
    model = tiny()
    engine = Engine(model, max_batch=4)  # driven by step() from a worker thread, as the engine thread does

    async def main():
        loop = asyncio.get_running_loop()
        wakeups = 0
        real = loop.call_soon_threadsafe

        def counting(callback, *args):
            nonlocal wakeups
            wakeups += callback.__module__ == "lmops.serve.engine"  # not asyncio.to_thread's own
            return real(callback, *args)

        loop.call_soon_threadsafe = counting
        handles = [engine.submit(prompt(3 + i, i), SamplingParams(max_tokens=6, temperature=0, logprobs=3))
                   for i in range(4)]
        steps = 0
        while not all(h.done for h in handles):
            await asyncio.to_thread(engine.step)
            steps += 1
        await asyncio.sleep(0)  # let the last delivery run
        assert wakeups == steps  # one call per step for all four streams, not one per token
        for h in handles:  # nobody read while they ran: each stream is there whole, in one batch
            batches = [b async for b in h.batches()]
            assert len(batches) == 1
            check_greedy(model, h, batches[0])

    asyncio.run(main())


def test_swap_model_new_requests_use_it_in_flight_finish_on_old(runtime):
    old, new = tiny(seed=0), tiny(seed=1, block_size=32)
    engine = Engine(old, max_batch=2, runtime=runtime)
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=3)
    a = engine.submit(prompt(4, 1), params)
    engine.step()
    engine.swap_model(new)
    b = engine.submit(prompt(4, 2), params)
    engine.step()
    assert engine.stats().running == 1 and engine.stats().waiting == 1  # b waits for a to finish
    while not b.done:
        engine.step()
    assert engine.model is new
    check_greedy(old, a, list(a))
    check_greedy(new, b, list(b))


def test_concurrent_submitters():
    model = tiny()
    engine = Engine(model, max_batch=4).start()
    results: dict[int, list[int]] = {}

    def client(i: int) -> None:
        h = engine.submit(prompt(2 + i, 30 + i), SamplingParams(max_tokens=10, temperature=0))
        results[i] = [e.token_id for e in h]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.stop(1)
    for i in range(6):
        assert results[i] == naive(model, prompt(2 + i, 30 + i), 10)[0]


def test_a_failing_forward_finishes_with_error_and_the_engine_goes_on(monkeypatch):
    model = tiny()
    engine = Engine(model).start()
    real = engine._forward  # the runtime's forward (onnxruntime here)

    def broken(idx, cache):
        monkeypatch.setattr(engine, "_forward", real)  # fail once
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine, "_forward", broken)
    failed = engine.submit(prompt(4, 1), SamplingParams(max_tokens=5, temperature=0))
    assert list(failed) == [] and failed.finish_reason == "error" and "out of memory" in failed.error
    ok = engine.submit(prompt(4, 1), SamplingParams(max_tokens=5, temperature=0))
    assert [e.token_id for e in ok] == naive(model, prompt(4, 1), 5)[0]
    engine.stop(1)


def test_a_row_the_sampler_cannot_take_fails_alone_and_its_batch_goes_on(monkeypatch):
    from lmops.serve import engine as engine_module

    real = engine_module.sample

    def picky(logits, temperature, *args, **kw):  # as a sampler failing on one row's parameters would
        if bool((temperature == 1.25).any()):
            raise RuntimeError("cannot sample this row")
        return real(logits, temperature, *args, **kw)

    monkeypatch.setattr(engine_module, "sample", picky)
    engine = Engine(tiny(), max_batch=8)
    params = [SamplingParams(max_tokens=6, temperature=t, top_k=k, seed=i)
              for i, (t, k) in enumerate([(0.9, None), (1.25, None), (0.8, 2**62), (1.0, 5)])]
    handles = [engine.submit(prompt(4, i), p) for i, p in enumerate(params)]
    for _ in range(50):
        if all(h.done for h in handles):
            break
        engine.step()
    assert [h.finish_reason for h in handles] == ["length", "error", "length", "length"]
    assert [h.completion_tokens for h in handles] == [6, 0, 6, 6] and "cannot sample" in handles[1].error


def test_runtime_choice_falls_back_to_torch_or_refuses_with_the_reason(caplog):
    odd = tiny(d_model=32)  # head_dim 8: onnxruntime's fused attention wants a multiple of 16
    with caplog.at_level("WARNING"):
        engine = Engine(odd)
    assert engine.runtime == "torch" and "head_dim 8 is not a multiple of 16" in caplog.text
    with pytest.raises(ValueError, match="onnxruntime: head_dim 8"):
        Engine(odd, runtime="onnxruntime")
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        Engine(tiny(), runtime="tensorrt")
    engine = Engine(tiny(), runtime="onnxruntime")
    with pytest.raises(ValueError, match="head_dim 8"):  # refused in the caller, the old model goes on
        engine.swap_model(odd)
    h = engine.submit(prompt(3, 1), SamplingParams(max_tokens=2, temperature=0))
    while not h.done:
        engine.step()
    assert engine.runtime == "onnxruntime" and h.completion_tokens == 2


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_engine_thread_uses_one_torch_thread_beside_onnxruntime_and_leaves_the_process_alone(runtime):
    before = torch.get_num_threads()
    engine = Engine(tiny(), runtime=runtime).start()
    seen = []
    real = engine._forward

    def spy(idx, cache):
        seen.append(torch.get_num_threads())
        return real(idx, cache)

    engine._forward = spy
    list(engine.submit(prompt(3, 1), SamplingParams(max_tokens=2, temperature=1.0)))
    engine.stop(1)
    assert set(seen) == {1 if runtime == "onnxruntime" else before}
    assert torch.get_num_threads() == before
    later = []  # a thread started afterwards gets the process's count, not the engine's
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert later == [before]
