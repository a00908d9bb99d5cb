"""The fast chunked linear attention (hand-written backward; fla on CUDA) against the references.

Forward and gradients in float64 to 1e-10 against the recurrent loop, torch.autograd.gradcheck
on tiny shapes, split-and-resume, torch.func composition, fla's own pure-PyTorch reference
and the CUDA dispatch to fla (skipped without CUDA).
"""
import pytest
import torch
from torch.func import grad, vmap

from lit_icl.ops import (
    CHUNK_SIZE,
    feature_map,
    linear_attention_chunked,
    linear_attention_chunked_autograd,
    linear_attention_recurrent,
)
from lit_icl.ops.fla import fla_naive
from lit_icl.ops.fla_linear_attention import fla_chunk_linear_attn, use_fla

TOL = dict(rtol=1e-10, atol=1e-10)


def inputs(B=2, H=2, T=13, d=3, D=4, fm="elu", state=True, seed=0, dtype=torch.float64):
    """Feature-mapped q, k, values v, and a random initial state (or None)."""
    g = torch.Generator().manual_seed(seed)
    phi = feature_map(fm)
    q, k = (phi(torch.randn(B, H, T, d, generator=g, dtype=dtype)) for _ in range(2))
    v = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    if not state:
        return q, k, v, None
    F = q.shape[-1]
    S0 = torch.randn(B, H, F, D, generator=g, dtype=dtype)
    return q, k, v, (S0, torch.rand(B, H, F, generator=g, dtype=dtype) + 0.5)


def loss_and_grads(fn, q, k, v, state, seed=3):
    """A loss on o AND on the final state (S, z), and its gradients w.r.t. q, k, v (S0, z0)."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v, *(state or ()))]
    o, (S, z) = fn(*leaves[:3], tuple(leaves[3:]) or None)
    g = torch.Generator().manual_seed(seed)
    wo, wS, wz = (torch.randn(x.shape, generator=g, dtype=x.dtype) for x in (o, S, z))
    loss = (o * wo).sum() + (S * wS).sum() + (z * wz).sum()
    return (o, S, z), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("fm,d", [("elu", 3), ("elu", 8), ("relu", 5), ("taylor", 2)])
@pytest.mark.parametrize("T", [1, 7, 16, 33, 70])
@pytest.mark.parametrize("chunk", [1, 4, 5, 16, 64])
@pytest.mark.parametrize("with_state", [True, False])
def test_forward_and_gradients_match_recurrent(fm, d, T, chunk, with_state):
    q, k, v, state = inputs(T=T, d=d, fm=fm, state=with_state)
    out_ref, grads_ref = loss_and_grads(linear_attention_recurrent, q, k, v, state)
    out, grads = loss_and_grads(lambda *a: linear_attention_chunked(*a, chunk_size=chunk), q, k, v, state)
    for got, want in zip((*out, *grads), (*out_ref, *grads_ref)):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("T,chunk", [(9, 4), (64, 16), (200, CHUNK_SIZE)])
def test_fast_equals_plain_autograd_chunked(T, chunk):
    q, k, v, state = inputs(B=1, H=3, T=T, d=6, D=5)
    plain = lambda *a: linear_attention_chunked_autograd(*a, chunk_size=chunk)
    out_ref, grads_ref = loss_and_grads(plain, q, k, v, state)
    out, grads = loss_and_grads(lambda *a: linear_attention_chunked(*a, chunk_size=chunk), q, k, v, state)
    for got, want in zip((*out, *grads), (*out_ref, *grads_ref)):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("T,chunk", [(5, 2), (6, 3), (4, 8)])
def test_gradcheck(T, chunk):
    q, k, v, (S0, z0) = inputs(B=1, H=2, T=T, d=2, D=3)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, S0, z0)]

    def fn(q, k, v, S0, z0):
        o, (S, z) = linear_attention_chunked(q, k, v, (S0, z0), chunk_size=chunk)
        return o, S, z

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8)


def test_split_and_resume():
    """Run part, carry the state, run the rest == run it all (outputs, state and gradients)."""
    q, k, v, state = inputs(T=45, d=4)

    def split(q, k, v, state, at=19):
        o1, st = linear_attention_chunked(q[:, :, :at], k[:, :, :at], v[:, :, :at], state, chunk_size=8)
        o2, st = linear_attention_chunked(q[:, :, at:], k[:, :, at:], v[:, :, at:], st, chunk_size=8)
        return torch.cat([o1, o2], dim=2), st

    out_ref, grads_ref = loss_and_grads(lambda *a: linear_attention_chunked(*a, chunk_size=8), q, k, v, state)
    out, grads = loss_and_grads(split, q, k, v, state)
    for got, want in zip((*out, *grads), (*out_ref, *grads_ref)):
        torch.testing.assert_close(got, want, **TOL)


def test_empty_sequence_keeps_the_state():
    q, k, v, state = inputs(T=0)
    o, (S, z) = linear_attention_chunked(q, k, v, state)
    assert o.shape == v.shape
    torch.testing.assert_close(S, state[0], **TOL)
    torch.testing.assert_close(z, state[1], **TOL)


@pytest.mark.parametrize("chunk", [0, -2, 2.5, True])
def test_bad_chunk_size(chunk):
    q, k, v, _ = inputs()
    with pytest.raises(ValueError, match=f"chunk_size={chunk!r} must be an integer >= 1"):
        linear_attention_chunked(q, k, v, chunk_size=chunk)


@pytest.mark.parametrize("in_dims", [(0, 0, 0, 0, 0), (None, None, 0, None, None), (None, None, None, 0, 0)])
def test_vmap_of_grad(in_dims):
    """torch.func.vmap(grad(...)) (how finetune_batched runs the model) == a loop of grads."""
    N = 3
    batch = [inputs(B=1, T=11, seed=s) for s in range(N)]
    args = [torch.stack([b[i] for b in batch]) for i in range(3)]
    args += [torch.stack([b[3][i] for b in batch]) for i in range(2)]
    args = [a if d == 0 else a[0] for a, d in zip(args, in_dims)]

    def loss(q, k, v, S0, z0):
        o, (S, z) = linear_attention_chunked(q, k, v, (S0, z0), chunk_size=4)
        return (o**2).sum() + (S * 0.3).sum() + z.sum()

    got = vmap(grad(loss, argnums=(0, 1, 2, 3, 4)), in_dims=in_dims)(*args)
    for n in range(N):
        row = [a[n] if d == 0 else a for a, d in zip(args, in_dims)]
        leaves = [x.clone().requires_grad_() for x in row]
        want = torch.autograd.grad(loss(*leaves), leaves)
        for g, w in zip(got, want):
            torch.testing.assert_close(g[n], w, **TOL)


def test_low_precision_inputs_compute_in_float32():
    q, k, v, _ = inputs(T=20, d=4, dtype=torch.float32)
    o32, (S32, _) = linear_attention_chunked(q, k, v, chunk_size=8)
    o16, (S16, _) = linear_attention_chunked(q.bfloat16(), k.bfloat16(), v.bfloat16(), chunk_size=8)
    assert o16.dtype == torch.bfloat16 and S16.dtype == torch.float32
    torch.testing.assert_close(o16.float(), o32, rtol=2e-2, atol=2e-2)


def test_matches_fla_naive_reference():
    """fla's naive_recurrent_linear_attn, normalize=True, scale=1 and its eps (1e-10), layout
    [B, T, H, D], carrying (S, z), where both definitions coincide. fla-core is in the dev extra:
    the oracle must be found, not skipped."""
    naive = fla_naive("linear_attn")
    assert naive is not None, "fla-core (dev extra) is not installed: pip install -e .[dev]"
    q, k, v, (S0, z0) = inputs(B=2, H=3, T=37, d=4, dtype=torch.float32)
    o, (S, z) = linear_attention_chunked(q, k, v, (S0, z0), chunk_size=8, eps=1e-10)
    t = lambda x: x.transpose(1, 2)
    o_ref, (S_ref, z_ref) = naive.naive_recurrent_linear_attn(
        t(q), t(k), t(v), scale=1.0, initial_state=(S0, z0[:, None]), output_final_state=True, normalize=True
    )
    torch.testing.assert_close(t(o), o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S, S_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z, z_ref[:, 0], rtol=1e-5, atol=1e-5)


def test_cpu_never_dispatches_to_fla():
    q, k, v, _ = inputs()
    assert not use_fla(q, v)


needs_fla_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or fla_chunk_linear_attn() is None,
    reason="needs a CUDA GPU and flash-linear-attention (pip install lit_icl[gpu]); not run on CPU",
)


@needs_fla_gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
def test_fla_dispatch_matches_pure_pytorch(dtype, tol):
    """fla's kernel (with initial and final state) against the float64 hand-written path,
    outputs, final state and gradients, within fp32 (TF32) / bf16 tolerances."""
    q, k, v, state = inputs(B=2, H=4, T=300, d=32, D=32, dtype=torch.float64)
    to = lambda x: x.cuda().to(dtype)
    assert use_fla(to(q), to(v))
    cuda = [x.cuda() for x in (q, k, v)]
    out_ref, grads_ref = loss_and_grads(linear_attention_chunked, *cuda, tuple(s.cuda() for s in state))
    out, grads = loss_and_grads(linear_attention_chunked, to(q), to(k), to(v), tuple(to(s) for s in state))
    for got, want in zip((*out, *grads), (*out_ref, *grads_ref)):
        scale = want.abs().max().clamp(min=1)
        torch.testing.assert_close(got.double() / scale, want / scale, rtol=tol, atol=tol)


@needs_fla_gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 5e-2)])
def test_fla_conversion_is_exact_within_tolerance(dtype, tol):
    """Exact conversion (Chen et al. 2024) on the GPU path: query on the converted state == query after the prompt."""
    from lit_icl import TransformerConfig, TransformerLM, convert

    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=50, n_layer=2, n_head=4, n_embd=128, block_size=256)
    model = TransformerLM(cfg).cuda().eval()
    demo, query = torch.randint(0, 50, (2, 160), device="cuda"), torch.randint(0, 50, (2, 40), device="cuda")
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32), torch.no_grad():
        prompted = model(torch.cat([demo, query], dim=1))[:, demo.shape[1]:].float()
        converted = model(query, state=convert(model, demo)).float()
    error = (converted - prompted).norm() / prompted.norm()
    assert error < tol, f"relative logit error {error:.2e} >= {tol} in {dtype}"
