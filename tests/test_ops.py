"""Attention ops: the fast forms against the slow references, float64 to 1e-10."""
import math

import pytest
import torch

from lit_icl.ops import (
    feature_dim,
    feature_map,
    linear_attention_chunked,
    linear_attention_quadratic,
    linear_attention_recurrent,
    momentum_chunked,
    momentum_recurrent,
    softmax_attention,
)

TOL = dict(rtol=1e-10, atol=1e-10)


def qkv(B=2, H=3, T=13, d=4, fm="elu", seed=0):
    g = torch.Generator().manual_seed(seed)
    phi = feature_map(fm)
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64) for _ in range(3))
    return phi(q), phi(k), v


def random_state(q, v, seed=1):
    g = torch.Generator().manual_seed(seed)
    B, H, _, F = q.shape
    S = torch.randn(B, H, F, v.shape[-1], generator=g, dtype=q.dtype)
    z = torch.rand(B, H, F, generator=g, dtype=q.dtype) + 0.5
    return S, z


@pytest.mark.parametrize("fm", ["elu", "relu", "taylor"])
@pytest.mark.parametrize("T", [1, 7, 16, 33])
@pytest.mark.parametrize("chunk", [1, 4, 5, 16, 64])
def test_linear_forms_agree(fm, T, chunk):
    q, k, v = qkv(T=T, fm=fm)
    state = random_state(q, v) if fm != "relu" else None
    o_ref, (S_ref, z_ref) = linear_attention_recurrent(q, k, v, state)
    for o, (S, z) in (
        linear_attention_quadratic(q, k, v, state),
        linear_attention_chunked(q, k, v, state, chunk_size=chunk),
    ):
        torch.testing.assert_close(o, o_ref, **TOL)
        torch.testing.assert_close(S, S_ref, **TOL)
        torch.testing.assert_close(z, z_ref, **TOL)


def test_linear_split_and_resume():
    """Run the first half, carry the state, run the rest == run it all."""
    q, k, v = qkv(T=29)
    o_all, (S_all, z_all) = linear_attention_chunked(q, k, v, chunk_size=8)
    o1, st = linear_attention_chunked(q[:, :, :11], k[:, :, :11], v[:, :, :11], chunk_size=8)
    o2, (S2, z2) = linear_attention_chunked(q[:, :, 11:], k[:, :, 11:], v[:, :, 11:], st, 8)
    torch.testing.assert_close(torch.cat([o1, o2], dim=2), o_all, **TOL)
    torch.testing.assert_close(S2, S_all, **TOL)
    torch.testing.assert_close(z2, z_all, **TOL)


def test_zero_keys_contribute_nothing():
    q, k, v = qkv(T=10)
    k2 = k.clone()
    k2[:, :, 3:6] = 0
    v2 = v.clone()
    v2[:, :, 3:6] = 1e6  # garbage values at masked positions must not leak
    _, (S, z) = linear_attention_chunked(q, k2, v2, chunk_size=4)
    keep = torch.tensor([i not in (3, 4, 5) for i in range(10)])
    _, (S_ref, z_ref) = linear_attention_recurrent(q[:, :, keep], k[:, :, keep], v[:, :, keep])
    torch.testing.assert_close(S, S_ref, **TOL)
    torch.testing.assert_close(z, z_ref, **TOL)


def test_linear_gradients_match_reference():
    q, k, v = qkv(T=11, d=3)
    S0, z0 = random_state(q, v)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, S0, z0)]
    grads = []
    for fn in (linear_attention_recurrent, lambda *a: linear_attention_chunked(*a, chunk_size=4)):
        o, (S, z) = fn(inputs[0], inputs[1], inputs[2], (inputs[3], inputs[4]))
        loss = (o**2).sum() + (S * 0.3).sum() + z.sum()
        grads.append(torch.autograd.grad(loss, inputs))
    for g_ref, g in zip(*grads):
        torch.testing.assert_close(g, g_ref, **TOL)


def test_matches_definition_by_hand():
    """One head, T=2, elu features: o_2 = (k1 v1 + k2 v2).q2 / (q2.(k1 + k2) + eps)."""
    q, k, v = qkv(B=1, H=1, T=2, d=2)
    o, _ = linear_attention_chunked(q, k, v, chunk_size=2, eps=0.0)
    q2, k1, k2, v1, v2 = q[0, 0, 1], k[0, 0, 0], k[0, 0, 1], v[0, 0, 0], v[0, 0, 1]
    expected = ((q2 @ k1) * v1 + (q2 @ k2) * v2) / (q2 @ (k1 + k2))
    torch.testing.assert_close(o[0, 0, 1], expected, **TOL)


def test_taylor_kernel_is_exp_taylor():
    d = 8
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, d, generator=g, dtype=torch.float64)
    phi = feature_map("taylor")
    s = (x @ y) / math.sqrt(d)
    assert phi(x).shape[-1] == feature_dim("taylor", d) == 1 + d + d * d
    torch.testing.assert_close(phi(x) @ phi(y), 1 + s + s * s / 2, **TOL)


def test_unknown_feature_map():
    with pytest.raises(ValueError, match="feature_map='cosh'.*allowed"):
        feature_map("cosh")


@pytest.mark.parametrize("T,chunk", [(1, 4), (9, 4), (16, 16), (23, 5)])
@pytest.mark.parametrize("eta", [0.0, 0.3, 0.9])
def test_momentum_forms_agree(T, chunk, eta):
    _, _, v = qkv(T=T)
    c0 = torch.randn(v.shape[0], v.shape[1], v.shape[3], dtype=v.dtype)
    mask = torch.ones(v.shape[0], T)
    mask[0, : T // 3] = 0  # left padding
    mask[1, T - T // 4 :] = 0  # right padding
    for m in (None, mask):
        ref, c_ref = momentum_recurrent(v, eta, c0, m)
        out, c = momentum_chunked(v, eta, c0, m, chunk_size=chunk)
        torch.testing.assert_close(out, ref, **TOL)
        torch.testing.assert_close(c, c_ref, **TOL)


def test_momentum_definition():
    """m_t = sum_{i<t} eta^{t-i} v_i without initial state."""
    _, _, v = qkv(T=6)
    eta = 0.7
    out, _ = momentum_chunked(v, eta, chunk_size=4)
    for t in range(6):
        expected = sum(eta ** (t - i) * v[:, :, i] for i in range(t)) if t else 0 * v[:, :, 0]
        torch.testing.assert_close(out[:, :, t], expected, **TOL)


def test_momentum_padding_is_transparent():
    _, _, v = qkv(B=1, T=8)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0]])
    out, c = momentum_chunked(v, 0.5, mask=mask, chunk_size=3)
    ref, c_ref = momentum_chunked(v[:, :, 2:7], 0.5, chunk_size=3)
    torch.testing.assert_close(out[:, :, 2:7], ref, **TOL)
    torch.testing.assert_close(c, c_ref, **TOL)


def test_softmax_prefix_equals_full_sequence():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 10, 4, generator=g, dtype=torch.float64) for _ in range(3))
    full = softmax_attention(q, k, v)
    out = softmax_attention(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], k[:, :, :6], v[:, :, :6])
    torch.testing.assert_close(out, full[:, :, 6:], **TOL)


def test_softmax_masked_keys_ignored():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    pm = torch.tensor([[0, 1, 1]])  # first prefix key is padding
    pk, pv = torch.randn(2, 1, 2, 3, 4, generator=g, dtype=torch.float64)
    out = softmax_attention(q, k, v, pk, pv, pm, mask=torch.ones(1, 6))
    ref = softmax_attention(q, k, v, pk[:, :, 1:], pv[:, :, 1:], torch.ones(1, 2))
    torch.testing.assert_close(out, ref, **TOL)
