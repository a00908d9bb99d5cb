"""Cross-entropy of a bias-free linear output head without the [N, V] logits tensor.

The LM's head maps the hidden states after the final norm, h [N, D], to logits h W^T [N, V].
At the text configs' sizes (N = 32 x 512 tokens, V = 16,384) the float32 logits are 1 GiB, and
their gradient and softmax another two: on the CPU every such tensor is mapped fresh and
returned to the OS each step (glibc's malloc serves anything above 32 MiB by mmap), and the page
faults cost more than the arithmetic. `chunked_cross_entropy` loops over chunks of rows instead
(Wijmans et al. 2025, "Cut Your Losses in Large-Vocabulary Language Models"): per chunk it forms
the [C, V] logits, their log-sum-exp and target logit, and the chunk's gradient
(softmax - one-hot) / count, which it multiplies into grad_h[chunk] = G W and grad_W += G^T h
before moving on; nothing of size N x V ever exists. Every chunk's logits go into one buffer
of C x V floats, allocated once per pass.

The chunk size trades that buffer against passes over grad_W: each chunk reads and writes all of
grad_W [V, D]. The default, `chunk_rows(V)`, is 64 MiB of logits (1024 rows at V = 16,384).
Measured on the CPU at N = 4096, D = 512, V = 16,384, one thread (loss and both gradients):
with glibc's malloc the full logits took 2.58 s and 270k page faults, chunks of 256 / 1024 /
2048 rows 2.00 / 1.94 / 1.99 s and 16k / 33k / 49k faults; with jemalloc (no page faults) the
full logits 1.55 s, chunks 1.66 / 1.56 / 1.54 s.

Where the gradient is made is the `recompute` choice:

- False (default): in the forward pass, as Liger-Kernel's fused linear cross-entropy does: three
  matmuls of the head per chunk (logits, G W, G^T h); the backward only scales the stored
  grad_h [N, D] and grad_W [V, D] by the incoming scalar gradient. Made only when an input needs
  a gradient (not under no_grad or for frozen inputs).
- True: the forward keeps only the log-sum-exp per row, and the backward recomputes each chunk's
  logits (four matmuls per chunk; nothing but [N] floats held between the passes).

The arithmetic is float32 whatever the inputs' dtype (float64 stays float64); the loss is a
float32 (float64) scalar and the gradients come back in the inputs' own dtypes. Autocast is off
inside (bf16-mixed would otherwise run the head in bf16). A weight tied to the embedding is just
a tensor here: autograd adds grad_W to the embedding's gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["chunked_cross_entropy", "chunk_rows", "CHUNK_BYTES"]

CHUNK_BYTES = 64 * 2**20  # one chunk's float32 logits at most (the module docstring's measurements)


def chunk_rows(vocab_size: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk whose float32 logits take at most `budget_bytes` (at least 16): 1024 at
    V = 16,384, 333 at GPT-2's 50,257."""
    return max(16, budget_bytes // (4 * vocab_size))


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _chunk_logits(h: Tensor, w: Tensor, buffer: Tensor) -> Tensor:
    """[C, V] logits of a chunk of rows, written into the first C rows of `buffer` (one buffer
    serves every chunk of a pass: one allocation, whatever the allocator does with it)."""
    return torch.mm(h, w.t(), out=buffer[: h.shape[0]])


def _softmax_minus_onehot_(probs: Tensor, labels: Tensor, scale: Tensor) -> Tensor:
    """In place: (probs - onehot(labels)) * scale[:, None], the chunk's dloss/dlogits."""
    probs.scatter_add_(1, labels[:, None], torch.full_like(scale[:, None], -1.0))
    return probs.mul_(scale[:, None])


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int, ignore_index: int,
                recompute: bool, want_argmax: bool):
        dtype = _compute_dtype(hidden, weight)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grads_now = (need_h or need_w) and not recompute
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            valid = labels != ignore_index
            safe = torch.where(valid, labels, 0)
            count = valid.sum()
            scale = valid.to(dtype) / count.clamp(min=1).to(dtype)  # d mean / d row loss; 0 on ignored rows
            N = hidden.shape[0]
            lse = torch.empty(N, dtype=dtype, device=hidden.device)
            target = torch.empty(N, dtype=dtype, device=hidden.device)
            argmax = torch.empty(N, dtype=torch.long, device=hidden.device) if want_argmax else None
            grad_h = torch.empty(N, w.shape[1], dtype=dtype, device=hidden.device) if grads_now and need_h else None
            grad_w = torch.zeros_like(w) if grads_now and need_w else None
            buffer = torch.empty(min(N, chunk_size), w.shape[0], dtype=dtype, device=hidden.device)
            for s in range(0, N, chunk_size):
                e = min(N, s + chunk_size)
                h = hidden[s:e].to(dtype)
                logits = _chunk_logits(h, w, buffer)
                target[s:e] = logits.gather(1, safe[s:e, None]).squeeze(1)
                if argmax is not None:
                    argmax[s:e] = logits.argmax(dim=1)
                peak = logits.amax(dim=1, keepdim=True)
                probs = logits.sub_(peak).exp_()  # in place: no second [C, V] tensor
                total = probs.sum(dim=1, keepdim=True)
                lse[s:e] = (peak + total.log()).squeeze(1)
                if grads_now:
                    g = _softmax_minus_onehot_(probs.div_(total), safe[s:e], scale[s:e])
                    if grad_h is not None:
                        torch.mm(g, w, out=grad_h[s:e])
                    if grad_w is not None:
                        torch.addmm(grad_w, g.t(), h, out=grad_w)  # not addmm_: FlopCounterMode counts no in-place op
            # NaN when every label is ignored, as F.cross_entropy
            loss = ((lse - target) * valid).sum() / count.to(dtype)
        ctx.mark_non_differentiable(*([argmax] if argmax is not None else []))
        ctx.recompute, ctx.chunk_size, ctx.dtypes = recompute, chunk_size, (hidden.dtype, weight.dtype)
        if recompute:
            ctx.save_for_backward(hidden, weight, safe, scale, lse)
        else:
            ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_h, grad_w)))
            ctx.have = (grad_h is not None, grad_w is not None)
        return (loss, argmax) if argmax is not None else loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        h_dtype, w_dtype = ctx.dtypes
        if not ctx.recompute:
            stored_h, stored_w = ctx.saved_tensors
            have_h, have_w = ctx.have
            grad_h = stored_h * grad_loss.to(stored_h.dtype) if need_h and have_h else None
            grad_w = stored_w * grad_loss.to(stored_w.dtype) if need_w and have_w else None
        else:
            hidden, weight, safe, scale, lse = ctx.saved_tensors
            dtype = lse.dtype
            with torch.autocast(hidden.device.type, enabled=False):
                w = weight.to(dtype)
                scale = scale * grad_loss.to(dtype)
                grad_h = torch.empty(hidden.shape[0], w.shape[1], dtype=dtype, device=hidden.device) if need_h else None
                grad_w = torch.zeros_like(w) if need_w else None
                buffer = torch.empty(min(hidden.shape[0], ctx.chunk_size), w.shape[0], dtype=dtype, device=hidden.device)
                for s in range(0, hidden.shape[0], ctx.chunk_size):
                    e = min(hidden.shape[0], s + ctx.chunk_size)
                    h = hidden[s:e].to(dtype)
                    probs = _chunk_logits(h, w, buffer).sub_(lse[s:e, None]).exp_()
                    g = _softmax_minus_onehot_(probs, safe[s:e], scale[s:e])
                    if grad_h is not None:
                        torch.mm(g, w, out=grad_h[s:e])
                    if grad_w is not None:
                        torch.addmm(grad_w, g.t(), h, out=grad_w)  # not addmm_: FlopCounterMode counts no in-place op
        return (None if grad_h is None else grad_h.to(h_dtype), None if grad_w is None else grad_w.to(w_dtype),
                None, None, None, None, None)


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int | None = None,
                          ignore_index: int = -100, *, recompute: bool = False,
                          return_argmax: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Mean cross-entropy of the logits `hidden @ weight.T` over the labels that are not
    `ignore_index`, equal to ``F.cross_entropy(hidden @ weight.T, labels, ignore_index=...)``
    (NaN when every label is ignored, with zero gradients, as that) but never holding the
    [N, V] logits: they are made `chunk_size` rows at a time.

    In the LightningModule, with the model's hidden states after its final norm::

        loss = chunked_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight, labels.flatten(), chunk_size)

    Args:
        hidden: [N, D] inputs of the head (any float dtype; may require grad).
        weight: [V, D] the head's weight (no bias; may be the tied embedding).
        labels: [N] long targets in [0, V), or `ignore_index`.
        chunk_size: rows per chunk; None: `chunk_rows(V)` (64 MiB of float32 logits a chunk).
        recompute: False: make the gradient in the forward pass (three head matmuls a chunk);
            True: recompute the logits in the backward (four; see the module docstring).
        return_argmax: also return the [N] argmax of each row's logits (for accuracy; free: a
            pass over each chunk's logits), not differentiable.

    Returns:
        the loss, a float32 scalar (float64 for float64 inputs), or (loss, argmax).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, D] and weight [V, D], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"need labels [N] = [{hidden.shape[0]}], got {tuple(labels.shape)}")
    if chunk_size is None:
        chunk_size = chunk_rows(weight.shape[0])
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer")
    return _ChunkedCrossEntropy.apply(hidden, weight, labels, chunk_size, ignore_index, recompute, return_argmax)
