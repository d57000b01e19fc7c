import pytest
import torch

from lmops.model import GPT, GPTConfig, KVCache, sample


def tiny(**kw) -> GPT:
    cfg = dict(vocab_size=53, n_layer=2, n_head=4, n_kv_head=4, d_model=32, mlp_hidden=96, block_size=24,
               rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True)
    cfg.update(kw)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg)).eval()
    with torch.no_grad():  # unit-scale weights: differences show above 1e-5
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_kv_cache_forward_matches_full_forward(kv_heads):
    model = tiny(n_kv_head=kv_heads)
    idx = torch.randint(0, 53, (3, 20))
    full = model(idx)
    cache = KVCache(model.cfg, 3, 24)
    parts = [model(idx[:, :7], cache=cache), model(idx[:, 7:8], cache=cache), model(idx[:, 8:20], cache=cache)]
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generate_equals_naive_recompute():
    model = tiny(tie_embeddings=False)
    idx = torch.randint(0, 53, (2, 5))
    out = model.generate(idx, 15, temperature=0)
    naive = idx
    for _ in range(15):
        naive = torch.cat((naive, model(naive)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, naive)


def test_generate_slides_past_block_size():
    model = tiny()
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 40, temperature=0)
    assert out.shape == (1, 43)


def test_forward_rejects_too_long_sequence():
    with pytest.raises(ValueError, match="block_size"):
        tiny()(torch.zeros(1, 25, dtype=torch.long))


def test_loss_is_cross_entropy_of_logits():
    model = tiny()
    idx, tgt = torch.randint(0, 53, (2, 10)), torch.randint(0, 53, (2, 10))
    logits, loss = model(idx, tgt)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits.view(-1, 53), tgt.view(-1)).item(), rel=1e-6)


def test_sampling_filters_and_seed():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    assert sample(logits, temperature=0).item() == 1
    draws = {sample(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(s)).item() for s in range(50)}
    assert draws == {1, 2}
    draws = {sample(logits, 1.0, top_p=0.3, generator=torch.Generator().manual_seed(s)).item() for s in range(50)}
    assert draws == {1}  # token 1 alone holds more than 30% of the mass
    a = [sample(logits, 1.5, generator=torch.Generator().manual_seed(7)).item() for _ in range(5)]
    assert len(set(a)) == 1


def test_rows_sampled_together_equal_rows_sampled_alone():
    torch.manual_seed(0)
    logits = 3 * torch.randn(6, 50)
    temperature = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.7, 1.3])
    top_k = torch.tensor([0, 5, 0, 1, 50, 3])  # 0 and >= V: no limit
    top_p = torch.tensor([1.0, 1.0, 0.5, 0.9, 0.2, 0.95])
    for trial in range(20):
        u = torch.rand(6, generator=torch.Generator().manual_seed(trial))
        together = sample(logits, temperature, top_k, top_p, uniform=u).view(-1).tolist()
        alone = [sample(logits[i:i + 1], temperature[i].item(), int(top_k[i]) or None, top_p[i].item(),
                        uniform=u[i:i + 1]).item() for i in range(6)]
        assert together == alone
        assert together[3] == int(logits[3].argmax())  # top_k 1
    # the largest uniform still lands on a token the filters kept, never on a masked tail
    edge = torch.full((6,), 1 - 2**-24)
    for row, token in enumerate(sample(logits, temperature, top_k, top_p, uniform=edge).view(-1).tolist()):
        k = int(top_k[row])
        if 0 < k < 50:
            assert token in logits[row].topk(k).indices.tolist()


def test_top_p_draws_from_the_nucleus_in_proportion():
    """The smallest set of most likely tokens whose mass reaches top_p, renormalised (the reference: a
    full sort, as Hugging Face's TopPLogitsWarper), for one top_p and for each row its own."""
    torch.manual_seed(1)
    logits = 3 * torch.randn(4, 50)
    n = 20_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # evenly spread: frequencies are the probabilities
    for top_p in (0.2, 0.5, 0.9, 0.95, torch.tensor([0.3, 0.6, 0.99, 0.8])):
        ps = top_p.tolist() if torch.is_tensor(top_p) else [top_p] * 4
        for row, p in enumerate(ps):
            probs = torch.softmax(logits[row], -1)
            sorted_probs, order = probs.sort(descending=True)
            keep = order[(sorted_probs.cumsum(0) - sorted_probs) < p]
            want = torch.zeros(50).index_put_((keep,), probs[keep])
            want /= want.sum()
            rows = logits[row:row + 1].expand(n, 50)
            row_p = top_p[row].expand(n) if torch.is_tensor(top_p) else top_p
            drawn = sample(rows, 1.0, top_p=row_p, uniform=u.float()).view(-1)
            got = torch.bincount(drawn, minlength=50).double() / n
            assert set(drawn.tolist()) == set(keep.tolist())
            assert (got - want).abs().max() < 2 / n + 1e-6
    both = sample(logits, 1.0, top_p=0.5, uniform=torch.full((4,), 0.999)).view(-1).tolist()  # one top_p, 4 rows
    assert both == [sample(logits[i:i + 1], 1.0, top_p=0.5, uniform=torch.full((1,), 0.999)).item() for i in range(4)]


def test_tied_embeddings_share_storage_and_param_groups_cover_all():
    model = tiny()
    assert model.lm_head.weight is model.embed.weight
    groups = model.param_groups(0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(p.dim() < 2 for p in groups[1]["params"])


def test_config_from_settings_fills_defaults():
    from lmops.config import ModelConfig

    cfg = GPTConfig.from_settings(ModelConfig(d_model=128), vocab_size=65)
    assert cfg.n_kv_head == 4 and cfg.mlp_hidden == 352 and cfg.head_dim == 32
