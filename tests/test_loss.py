"""chunked_cross_entropy against the obvious reference F.cross_entropy(hidden @ weight.T, labels):
the loss and both gradients, in float64 (to ~1e-12), float32 (~1e-5 relative) and bf16, with
ignored labels, chunk sizes that do not divide N or exceed it, either gradient mode."""
import pytest
import torch
import torch.nn.functional as F

from lit_icl.loss import chunk_rows, chunked_cross_entropy

IGNORE = -100


def inputs(N: int, D: int, V: int, dtype: torch.dtype, seed: int = 0, ignored=()):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[list(ignored)] = IGNORE
    return hidden, weight, labels


def reference(hidden, weight, labels, upstream: float = 1.7):
    """Loss and the gradients of upstream * loss, by the full logits (in float64 when asked)."""
    loss = F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE)
    return (loss, *torch.autograd.grad(loss * upstream, (hidden, weight)))


def chunked(hidden, weight, labels, chunk_size, upstream: float = 1.7, **kw):
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_size, IGNORE, **kw)
    return (loss, *torch.autograd.grad(loss * upstream, (hidden, weight)))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-300))


CASES = {  # name: (N, chunk_size, ignored rows)
    "chunk does not divide N": (37, 8, (0, 5, 36)),
    "N smaller than one chunk": (5, 16, (2,)),
    "a whole chunk ignored": (32, 8, tuple(range(8, 16))),
    "one row per chunk": (6, 1, (3,)),
}


@pytest.mark.parametrize("recompute", [False, True], ids=["grad-in-forward", "recompute"])
@pytest.mark.parametrize("case", list(CASES))
def test_float64_matches_reference(case, recompute):
    N, C, ignored = CASES[case]
    h, w, labels = inputs(N, 12, 50, torch.float64, ignored=ignored)
    want, got = reference(h, w, labels), chunked(h, w, labels, C, recompute=recompute)
    assert got[0].dtype == torch.float64 and got[0].shape == ()
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert relative_error(a, b) < 1e-12, (name, relative_error(a, b))
    assert float(got[1][list(ignored)].abs().max()) == 0.0  # an ignored row gets no gradient


@pytest.mark.parametrize("recompute", [False, True], ids=["grad-in-forward", "recompute"])
def test_float32_matches_reference(recompute):
    h, w, labels = inputs(300, 64, 1000, torch.float32, seed=1, ignored=range(0, 300, 7))
    want, got = reference(h, w, labels), chunked(h, w, labels, 64, recompute=recompute)
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), got, want):
        assert a.dtype == torch.float32, name
        assert relative_error(a, b) < 1e-5, (name, relative_error(a, b))


@pytest.mark.parametrize("recompute", [False, True], ids=["grad-in-forward", "recompute"])
def test_every_label_ignored_is_nan_with_zero_gradients_like_the_reference(recompute):
    h, w, labels = inputs(10, 4, 9, torch.float64, ignored=range(10))
    want, got = reference(h, w, labels), chunked(h, w, labels, 4, recompute=recompute)
    assert torch.isnan(want[0]) and torch.isnan(got[0])
    for a, b in zip(got[1:], want[1:]):
        assert torch.equal(a, b) and float(a.abs().max()) == 0.0


@pytest.mark.parametrize("recompute", [False, True], ids=["grad-in-forward", "recompute"])
def test_bf16_computes_in_float32_and_returns_grads_in_bf16(recompute):
    h, w, labels = inputs(70, 32, 200, torch.bfloat16, seed=2, ignored=(1, 2))
    loss, gh, gw = chunked(h, w, labels, 16, recompute=recompute)
    assert loss.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    # the reference on the same bf16 values, in float32 throughout
    h32, w32 = (x.detach().float().requires_grad_() for x in (h, w))
    want = reference(h32, w32, labels)
    assert relative_error(loss, want[0]) < 1e-5
    for a, b in zip((gh, gw), want[1:]):
        assert relative_error(a, b) < 1e-2  # bf16 rounding of the returned gradient (2^-8)


def test_autocast_does_not_lower_the_head_to_bf16():
    h, w, labels = inputs(40, 32, 300, torch.float32, seed=3)
    want = reference(h, w, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = reference(h, w, labels)  # what autocast makes of the reference: bf16 logits
        got = chunked(h, w, labels, 16)
    assert [x.dtype for x in got] == [torch.float32] * 3
    for a, b in zip(got, want):
        assert relative_error(a, b) < 1e-5
    assert relative_error(low[1], want[1]) > 1e-3  # the check above can tell bf16 from float32


def test_tied_weight_gets_embedding_and_head_gradients():
    """The head's weight is the embedding's: autograd adds both uses, as with full logits."""
    torch.manual_seed(0)
    V, D, N = 30, 8, 23
    emb = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    proj = torch.randn(D, D, dtype=torch.float64, requires_grad=True)
    ids, labels = torch.randint(0, V, (N,)), torch.randint(0, V, (N,))
    hidden = lambda: torch.tanh(emb[ids] @ proj)
    want = torch.autograd.grad(F.cross_entropy(hidden() @ emb.T, labels), (emb, proj))
    got = torch.autograd.grad(chunked_cross_entropy(hidden(), emb, labels, 5), (emb, proj))
    for a, b in zip(got, want):
        assert relative_error(a, b) < 1e-12


@pytest.mark.parametrize("recompute", [False, True], ids=["grad-in-forward", "recompute"])
def test_one_input_frozen(recompute):
    h, w, labels = inputs(19, 6, 11, torch.float64, ignored=(4,))
    want = reference(h, w, labels)
    for frozen in ("hidden", "weight"):
        hh = h.detach().requires_grad_(frozen != "hidden")
        ww = w.detach().requires_grad_(frozen != "weight")
        leaf = ww if frozen == "hidden" else hh
        (grad,) = torch.autograd.grad(chunked_cross_entropy(hh, ww, labels, 4, IGNORE, recompute=recompute) * 1.7, leaf)
        assert relative_error(grad, want[2 if frozen == "hidden" else 1]) < 1e-12


def test_no_grad_loss_and_argmax_for_accuracy():
    h, w, labels = inputs(45, 10, 70, torch.float64, seed=4, ignored=(0,))
    logits = h.detach() @ w.detach().T
    with torch.no_grad():
        loss, argmax = chunked_cross_entropy(h, w, labels, 8, return_argmax=True)
    assert loss.grad_fn is None and argmax.dtype == torch.long
    assert relative_error(loss, F.cross_entropy(logits, labels, ignore_index=IGNORE)) < 1e-12
    assert torch.equal(argmax, logits.argmax(-1))
    # with grad: the argmax rides along without a gradient and leaves the loss's gradients alone
    loss, argmax = chunked_cross_entropy(h, w, labels, 8, return_argmax=True)
    assert not argmax.requires_grad and torch.equal(argmax, logits.argmax(-1))
    got = torch.autograd.grad(loss * 1.7, (h, w))
    for a, b in zip(got, reference(h, w, labels)[1:]):
        assert relative_error(a, b) < 1e-12


def test_default_chunk_size_and_checks():
    assert chunk_rows(16384) == 1024 and chunk_rows(50257) == 333 and chunk_rows(10**7) == 16
    h, w, labels = inputs(300, 4, 20, torch.float64)
    assert relative_error(chunked_cross_entropy(h, w, labels), reference(h, w, labels)[0]) < 1e-12
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(h, w, labels, 0)
    with pytest.raises(ValueError, match="labels"):
        chunked_cross_entropy(h, w, labels[:-1], 4)
    with pytest.raises(ValueError, match="weight"):
        chunked_cross_entropy(h, w.T, labels, 4)


def test_flop_counter_sees_every_head_matmul():
    """The throughput callback counts FLOPs with FlopCounterMode, which skips in-place ops: the
    chunked loss does the reference's three head matmuls (four with recompute), all counted."""
    from torch.utils.flop_counter import FlopCounterMode

    h, w, labels = inputs(100, 16, 50, torch.float32)
    counts = []
    for loss_fn in (lambda: F.cross_entropy(h @ w.T, labels), lambda: chunked_cross_entropy(h, w, labels, 32),
                    lambda: chunked_cross_entropy(h, w, labels, 32, recompute=True)):
        counter = FlopCounterMode(display=False)
        with counter:
            loss_fn().backward()
        counts.append(counter.get_total_flops() / (2 * 100 * 16 * 50))
    assert counts == [3, 3, 4]
