"""Approximate conversion for softmax attention (ICLAA, Chen et al. 2024): feature maps of the exp
kernel, the biased softmax, and the error ordering kv = 0 < approximate < no context."""
import math

import pytest
import torch
import torch.nn.functional as F

from lit_icl import ContextState, TransformerConfig, TransformerLM, convert
from lit_icl.mixers.approximate import softmax_attention_biased
from lit_icl.ops import positive_random_features, softmax_attention, taylor


def test_positive_random_features_estimate_the_exp_kernel():
    g = torch.Generator().manual_seed(0)
    d, m = 8, 200_000
    q, k = torch.randn(2, d, generator=g, dtype=torch.float64) * 0.5
    W = torch.randn(m, d, generator=g, dtype=torch.float64)
    estimate = positive_random_features(q[None], W) @ positive_random_features(k[None], W).T
    assert estimate.item() == pytest.approx(math.exp(q @ k / math.sqrt(d)), rel=0.02)
    assert (positive_random_features(q[None], W) > 0).all()


def test_biased_softmax_without_context_is_softmax():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 4, generator=g, dtype=torch.float64) for _ in range(3))
    fq = taylor(q)
    S, z = torch.zeros(2, 3, fq.shape[-1], 4, dtype=torch.float64), torch.zeros(2, 3, fq.shape[-1], dtype=torch.float64)
    torch.testing.assert_close(softmax_attention_biased(q, k, v, fq, S, z), softmax_attention(q, k, v))


def test_biased_softmax_with_exact_features_is_the_prefix():
    """With phi(q).phi(k') equal to exp(q.k'/sqrt d) (one-hot features over one query), the
    biased softmax reproduces attention over the context keys exactly."""
    g = torch.Generator().manual_seed(1)
    d = 4
    q, k, v = (torch.randn(1, 1, 1, d, generator=g, dtype=torch.float64) for _ in range(3))
    pk, pv = (torch.randn(1, 1, 3, d, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.exp((q @ pk.transpose(-1, -2)) / math.sqrt(d))  # [1, 1, 1, 3]: phi(q) = w, phi(k'_j) = e_j
    S, z = pv[0, 0][None, None], torch.ones(1, 1, 3, dtype=torch.float64)
    out = softmax_attention_biased(q, k, v, w, S, z)
    torch.testing.assert_close(out, softmax_attention(q, k, v, pk, pv))


def rel(a, b):
    return ((a - b).norm() / a.norm()).item()


@pytest.fixture(scope="module")
def trained_softmax():
    """A small softmax LM trained 300 steps on an induction-style copy task (a few seconds)."""
    torch.manual_seed(0)
    V = 32
    model = TransformerLM(TransformerConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=32, block_size=64,
                                            attention="softmax", token_shift=True))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        half = torch.randint(1, V, (32, 12))
        x = torch.cat([half, half], 1)  # second half predictable from the first
        loss = F.cross_entropy(model(x)[:, 11:-1].flatten(0, 1), x[:, 12:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_error_ordering_on_a_trained_model(trained_softmax):
    model = trained_softmax
    g = torch.Generator().manual_seed(5)
    demo, query = torch.randint(1, 32, (16, 20), generator=g), torch.randint(1, 32, (16, 6), generator=g)
    prompted = model(torch.cat([demo, query], 1))[:, 20:]
    errors = {"none": rel(prompted, model(query))}
    for mode in ("kv", "prf", "taylor"):
        state = convert(model, demo, mode=mode, num_features=512, seed=0)
        errors[mode] = rel(prompted, model(query, state=state))
    assert errors["kv"] < 1e-6
    assert errors["kv"] < errors["prf"] < errors["none"]
    assert errors["kv"] < errors["taylor"] < errors["none"]


def test_approximate_state_round_trip_and_padding(tmp_path, trained_softmax):
    model = trained_softmax
    demo = torch.randint(1, 32, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    state = convert(model, demo, attention_mask=mask, mode="prf", num_features=64, seed=3)
    assert state.offset.tolist() == [9, 5] and state.layers[0].mixer.W.shape == (2, 2, 64, 16)
    alone = convert(model, demo[1:, 4:], mode="prf", num_features=64, seed=3)
    query = torch.randint(1, 32, (1, 4))
    torch.testing.assert_close(model(query, state=state.select(1)), model(query, state=alone), rtol=1e-5, atol=1e-5)
    path = tmp_path / "prf.safetensors"
    state.save(path, model)
    loaded = ContextState.load(path, model)
    assert loaded.mode == "prf"
    torch.testing.assert_close(model(query.expand(2, -1), state=loaded), model(query.expand(2, -1), state=state))
    with pytest.raises(ValueError, match="num_features=0"):
        convert(model, demo, mode="prf", num_features=0)
    with pytest.raises(ValueError, match="cannot continue a 'prf' state in mode 'kv'"):
        convert(model, demo, state=state, mode="kv")
