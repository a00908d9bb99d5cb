"""The recurrent family's ops (retention, simple GLA, GLA, DeltaNet): chunked forms against the
recurrent references in float64 to 1e-10 (values and gradients, initial state included),
split-and-resume, segments, strong decay, neutral (padding) tokens, and fla's own pure-PyTorch
references as oracles (fla-core is in the dev extra: they run, never skip). The CUDA dispatch
to fla's chunk kernels is tested where a GPU is present.

A new kind is covered by adding it to KINDS (and to ORACLES).
"""
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import lit_icl.ops.chunking as chunking
from lit_icl.ops import (
    delta_rule_chunked,
    delta_rule_recurrent,
    gla_chunked,
    gla_recurrent,
    retention_gamma,
    retention_recurrent,
    simple_gla_chunked,
    simple_gla_recurrent,
)
from lit_icl.ops.fla import fla_applicable, fla_naive
from lit_icl.ops.retention import retention_log_gates

TOL = dict(rtol=1e-10, atol=1e-10)


@dataclass
class Kind:
    recurrent: Callable
    chunked: Callable
    gate: Callable  # (B, H, T, K, generator, dtype, strength) -> the kind's gate tensor
    neutral: float | None  # the gate of a token that leaves the state unchanged (with k = 0)
    fla: tuple  # (op, kernel) of fla's CUDA chunk kernel

    @property
    def timed(self) -> bool:
        """Whether the gate has a time axis (retention's decay is one number per head)."""
        return self.neutral is not None


def retention_chunked(q, k, v, gamma, initial_state=None, scale=None, chunk_size=32):
    """What the Retention layer runs: simple GLA's chunked form with the log gates log gamma_h."""
    return simple_gla_chunked(q, k, v, retention_log_gates(q, k, v, gamma), initial_state, scale, chunk_size)


def log_gates(*shape, g, dtype, strength):
    """logsigmoid log gates; strength scales them (strength 1: mean about -0.7 per step)."""
    return F.logsigmoid(torch.randn(*shape, generator=g, dtype=dtype)) * strength


KINDS = {
    "retention": Kind(retention_recurrent, retention_chunked,
                      lambda B, H, T, K, g, dtype, s: retention_gamma(H, dtype=dtype) ** s, None,
                      ("simple_gla", "chunk_simple_gla")),
    "simple_gla": Kind(simple_gla_recurrent, simple_gla_chunked,
                       lambda B, H, T, K, g, dtype, s: log_gates(B, H, T, g=g, dtype=dtype, strength=s), 0.0,
                       ("simple_gla", "chunk_simple_gla")),
    "gla": Kind(gla_recurrent, gla_chunked,
                lambda B, H, T, K, g, dtype, s: log_gates(B, H, T, K, g=g, dtype=dtype, strength=s), 0.0,
                ("gla", "chunk_gla")),
    "delta_rule": Kind(delta_rule_recurrent, delta_rule_chunked,
                       lambda B, H, T, K, g, dtype, s: torch.rand(B, H, T, generator=g, dtype=dtype), 0.0,
                       ("delta_rule", "chunk_delta_rule")),
}


def inputs(kind, B=2, H=3, T=13, K=4, V=5, state=True, seed=0, dtype=torch.float64, strength=1.0):
    """q, k, v, the kind's gate and an initial state (or None); DeltaNet's q, k L2-normalised."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, K, generator=g, dtype=dtype) for _ in range(2))
    if kind == "delta_rule":
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    v = torch.randn(B, H, T, V, generator=g, dtype=dtype)
    gate = KINDS[kind].gate(B, H, T, K, g, dtype, strength)
    S0 = torch.randn(B, H, K, V, generator=g, dtype=dtype) if state else None
    return q, k, v, gate, S0


def loss_and_grads(fn, q, k, v, gate, S0, seed=3):
    """(o, S) of fn and the gradients of a random linear loss on both w.r.t. every input
    (None for an input fn does not use; S may be None for an oracle without a final state)."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v, gate, *([S0] if S0 is not None else []))]
    o, S = fn(*leaves[:4], leaves[4] if S0 is not None else None)
    g = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum()
    if S is not None:
        loss = loss + (S * torch.randn(S.shape, generator=g, dtype=S.dtype)).sum()
    return (o, S), torch.autograd.grad(loss, leaves, allow_unused=True)


def assert_all_close(got, want, **tol):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **(tol or TOL))


def chunked(kind, chunk_size):
    return lambda q, k, v, gate, S0: KINDS[kind].chunked(q, k, v, gate, S0, chunk_size=chunk_size)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1, 7, 16, 33])
@pytest.mark.parametrize("chunk", [1, 4, 5, 8, 16, 64])
@pytest.mark.parametrize("with_state", [True, False])
def test_chunked_matches_recurrent(kind, T, chunk, with_state):
    x = inputs(kind, T=T, state=with_state)
    out_ref, grads_ref = loss_and_grads(KINDS[kind].recurrent, *x)
    out, grads = loss_and_grads(chunked(kind, chunk), *x)
    assert_all_close((*out, *grads), (*out_ref, *grads_ref))


@pytest.mark.parametrize("kind", KINDS)
def test_default_chunk_size_and_scale(kind):
    """Defaults: the kind's own chunk size, scale = 1/sqrt(K); an explicit scale is honoured."""
    q, k, v, gate, S0 = inputs(kind, T=70, K=8)
    o, S = KINDS[kind].chunked(q, k, v, gate, S0)
    o_ref, S_ref = KINDS[kind].recurrent(q, k, v, gate, S0)
    assert_all_close((o, S), (o_ref, S_ref))
    torch.testing.assert_close(KINDS[kind].recurrent(q / 8**0.5, k, v, gate, S0, scale=1.0)[0], o_ref, **TOL)
    o3, _ = KINDS[kind].chunked(q, k, v, gate, S0, scale=0.3)
    torch.testing.assert_close(o3, KINDS[kind].recurrent(0.3 * q, k, v, gate, S0, scale=1.0)[0], **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_split_and_resume(kind):
    """Run part, carry the state, run the rest == run it all (outputs, state and gradients)."""
    q, k, v, gate, S0 = inputs(kind, T=45)
    at, fn = 19, KINDS[kind].chunked
    part = lambda x, sl: x[:, :, sl] if x.dim() > 1 else x  # retention's gamma [H] has no time axis

    def split(q, k, v, gate, S0):
        first, rest = slice(None, at), slice(at, None)
        o1, S = fn(*(part(x, first) for x in (q, k, v, gate)), S0, chunk_size=8)
        o2, S = fn(*(part(x, rest) for x in (q, k, v, gate)), S, chunk_size=8)
        return torch.cat([o1, o2], dim=2), S

    out_ref, grads_ref = loss_and_grads(chunked(kind, 8), q, k, v, gate, S0)
    out, grads = loss_and_grads(split, q, k, v, gate, S0)
    assert_all_close((*out, *grads), (*out_ref, *grads_ref))


@pytest.mark.parametrize("kind", KINDS)
def test_segments_equal_one_pass(kind, monkeypatch):
    """Long inputs run as segments (state carried): force several and compare to the reference."""
    monkeypatch.setattr(chunking, "SEGMENT_ELEMENTS", 2 * 3 * 8 * 20)  # a few chunks per segment
    x = inputs(kind, T=50)
    out_ref, grads_ref = loss_and_grads(KINDS[kind].recurrent, *x)
    out, grads = loss_and_grads(chunked(kind, 4), *x)
    assert_all_close((*out, *grads), (*out_ref, *grads_ref))


@pytest.mark.parametrize("kind", ["retention", "simple_gla", "gla"])
@pytest.mark.parametrize("strength", [7.0, 70.0])
@pytest.mark.parametrize("chunk", [16, 64])
def test_strong_decay_is_finite_and_exact(kind, strength, chunk):
    """Log gates around -5 (and -50) per step over T=256: the chunked form never takes exp of a
    large positive number, so it stays finite in float32 and exact in float64."""
    for dtype, tol in ((torch.float64, TOL), (torch.float32, dict(rtol=1e-4, atol=1e-4))):
        x = inputs(kind, B=1, H=2, T=256, K=8, V=4, dtype=dtype, strength=strength)
        if kind == "retention":  # the decay itself is the gate: gamma = exp(-5), exp(-50)
            x = (*x[:3], torch.full((2,), -strength / 1.4, dtype=dtype).exp(), x[4])
        log_gate = x[3].log() if kind == "retention" else x[3]
        assert log_gate.mean() < -4.0
        out_ref, grads_ref = loss_and_grads(KINDS[kind].recurrent, *x)
        out, grads = loss_and_grads(chunked(kind, chunk), *x)
        assert all(torch.isfinite(t).all() for t in (*out, *grads))
        if kind == "retention":  # d/dgamma = (d/dlog gamma) / gamma: e^50 times rounding, by the chain rule
            grads, grads_ref = grads[:3] + grads[4:], grads_ref[:3] + grads_ref[4:]
        assert_all_close((*out, *grads), (*out_ref, *grads_ref), **tol)


@pytest.mark.parametrize("kind", [name for name, kind in KINDS.items() if kind.timed])
def test_neutral_tokens_leave_the_state(kind):
    """A token with k = 0 and the neutral gate (no decay, beta = 0) changes nothing: how a layer
    masks padding. Insert three such tokens: same outputs elsewhere, same final state."""
    q, k, v, gate, S0 = inputs(kind, T=12)
    keep = torch.tensor([t not in (4, 5, 6) for t in range(15)])

    def spread(x, fill):  # x over the kept positions of 15, fill at the inserted ones
        out = torch.full((*x.shape[:2], 15, *x.shape[3:]), fill, dtype=x.dtype)
        out[:, :, keep] = x
        return out

    fn = chunked(kind, 4)
    o, S = fn(spread(q, 0.5), spread(k, 0.0), spread(v, 1e6), spread(gate, KINDS[kind].neutral), S0)
    o_ref, S_ref = fn(q, k, v, gate, S0)
    assert_all_close((o[:, :, keep], S), (o_ref, S_ref))


def _from_fla_layout(fn):
    """fn(q, k, v, gate, S0) -> (o, S) in fla's layout [B, T, H, *] as the same in lit_icl's."""
    t = lambda x: x.transpose(1, 2)

    def call(q, k, v, gate, S0):
        o, S = fn(t(q), t(k), t(v), t(gate), S0)
        return t(o), S

    return call


def _oracles(kind):
    """fla's pure-PyTorch references for a kind, each as (fn(q, k, v, gate, S0) -> (o, S or None)
    in lit_icl's layout, whether it takes an initial state); their scale is fla's default
    1/sqrt(K), as is ours."""
    naive = fla_naive(kind)
    assert naive is not None, "fla-core (dev extra) is not installed: pip install -e .[dev]"
    if kind == "retention":  # the parallel form, no state, gamma_h = 1 - 2^(-5-h) built in; [B, H, T, D]
        return {"naive_retention": (lambda q, k, v, gate, S0: (naive.naive_retention(q, k, v), None), False)}
    if kind == "simple_gla":
        return {"naive_recurrent_simple_gla": (_from_fla_layout(lambda q, k, v, g, S0: naive.naive_recurrent_simple_gla(
                    q, k, v, g, initial_state=S0, output_final_state=True)), True),
                "naive_chunk_simple_gla": (_from_fla_layout(lambda q, k, v, g, S0: naive.naive_chunk_simple_gla(
                    q, k, v, g, initial_state=S0, output_final_state=True, chunk_size=16)), True)}
    if kind == "gla":
        return {"naive_recurrent_gla": (_from_fla_layout(lambda q, k, v, g, S0: naive.naive_recurrent_gla(
                    q, k, v, g, initial_state=S0, output_final_state=True)), True)}
    assert kind == "delta_rule"  # [B, H, T, D]
    return {"delta_rule_recurrence": (lambda q, k, v, b, S0: naive.delta_rule_recurrence(
                q, k, v, b, initial_state=S0, output_final_state=True), True),
            "delta_rule_chunkwise": (
                lambda q, k, v, b, S0: naive.delta_rule_chunkwise(q, k, v, b, chunk_size=16), False)}


ORACLES = [(kind, name) for kind in KINDS for name in _oracles(kind)]


@pytest.mark.parametrize("kind,oracle", ORACLES)
@pytest.mark.parametrize("form", ["chunked", "recurrent"])
def test_matches_fla_naive_reference(kind, oracle, form):
    """Values, final state and gradients against fla's own reference, in float32 (fla's
    references compute in float32), carrying an initial state where the reference takes one."""
    fn, with_state = _oracles(kind)[oracle]
    x = inputs(kind, B=2, H=3, T=48, K=8, V=6, dtype=torch.float32, state=with_state)
    ours = chunked(kind, 16) if form == "chunked" else KINDS[kind].recurrent
    (o_ref, S_ref), grads_ref = loss_and_grads(fn, *x)
    if S_ref is None:  # the same loss on both sides: on o only
        ours = (lambda f: lambda *a: (f(*a)[0], None))(ours)
    (o, S), grads = loss_and_grads(ours, *x)
    compared = [(g, r) for g, r in zip(grads, grads_ref) if r is not None]  # naive_retention: no gamma
    assert len(compared) >= 3 + with_state  # q, k, v (and the initial state)
    assert_all_close([o, *([S] if S_ref is not None else []), *(g for g, _ in compared)],
                     [o_ref, *([S_ref] if S_ref is not None else []), *(r for _, r in compared)],
                     rtol=1e-4, atol=1e-4)


def test_fla_naive_loader():
    """The loader finds every reference these tests use, and names the ops for an unknown one."""
    for op in ("linear_attn", *KINDS):
        assert fla_naive(op) is not None
    with pytest.raises(ValueError, match="op='nope'.*ops with one: .*'gla'"):
        fla_naive("nope")


@pytest.mark.parametrize("kind", KINDS)
def test_empty_sequence_keeps_the_state(kind):
    q, k, v, gate, S0 = inputs(kind, T=0)
    for fn in (KINDS[kind].recurrent, KINDS[kind].chunked):
        o, S = fn(q, k, v, gate, S0)
        assert o.shape == v.shape
        torch.testing.assert_close(S, S0, **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_inputs_compute_in_float32(kind):
    x32 = inputs(kind, T=40, K=8, V=8, dtype=torch.float32)
    o32, S32 = KINDS[kind].chunked(*x32, chunk_size=16)
    o16, S16 = KINDS[kind].chunked(*(t.bfloat16() for t in x32), chunk_size=16)
    assert o16.dtype == torch.bfloat16 and S16.dtype == torch.float32
    torch.testing.assert_close(o16.float(), o32, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_inputs_name_the_value(kind):
    q, k, v, gate, S0 = inputs(kind)
    fns = (KINDS[kind].recurrent, KINDS[kind].chunked)
    for fn in fns:
        with pytest.raises(ValueError, match=r"shapes q=\(2, 3, 13, 4\), k=\(2, 3, 12, 4\)"):
            fn(q, k[:, :, 1:], v, gate, S0)
        with pytest.raises(ValueError, match=r"initial_state has shape \(2, 3, 5, 4\); expected \(2, 3, 4, 5\)"):
            fn(q, k, v, gate, S0.transpose(-1, -2))
        bad_gate = gate[:-1] if gate.dim() == 1 else gate[:, :, 1:]
        with pytest.raises(ValueError, match=r"(gamma|g|beta) has shape .* expected"):
            fn(q, k, v, bad_gate, S0)
    with pytest.raises(ValueError, match="chunk_size=0 must be an integer >= 1"):
        KINDS[kind].chunked(q, k, v, gate, S0, chunk_size=0)


def test_retention_gamma_is_retnets():
    torch.testing.assert_close(retention_gamma(3, dtype=torch.float64),
                               torch.tensor([1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128], dtype=torch.float64))
    with pytest.raises(ValueError, match="n_heads=0 must be an integer >= 1"):
        retention_gamma(0)


@pytest.mark.parametrize("kind", KINDS)
def test_cpu_never_dispatches_to_fla(kind):
    q, _, v, _, _ = inputs(kind)
    assert not fla_applicable(q, v, *KINDS[kind].fla)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; not run on CPU")


@needs_cuda
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 5e-2)])
def test_fla_dispatch_matches_pure_pytorch(kind, dtype, tol):
    """fla's chunk kernel (initial and final state) against the float64 pure-PyTorch chunked form
    on the same GPU: outputs, final state and gradients, within fp32 (TF32) / bf16 tolerances."""
    pytest.importorskip("triton", reason="fla's kernels need Triton (pip install lit_icl[gpu])")
    if kind == "delta_rule" and dtype == torch.float32:
        pytest.skip("fla's chunk_delta_rule rejects float32; float32 takes the pure-PyTorch path")
    x = [t.cuda() for t in inputs(kind, B=2, H=4, T=300, K=32, V=32)]
    to = [t.to(dtype) if t.dim() > 1 else t.float() for t in x[:4]] + [x[4].float()]
    assert fla_applicable(to[0], to[2], *KINDS[kind].fla)
    out_ref, grads_ref = loss_and_grads(KINDS[kind].chunked, *x)
    out, grads = loss_and_grads(KINDS[kind].chunked, *to)
    for got, want in zip((*out, *grads), (*out_ref, *grads_ref)):
        scale = want.abs().max().clamp(min=1)
        torch.testing.assert_close(got.double() / scale, want / scale, rtol=tol, atol=tol)
