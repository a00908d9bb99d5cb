"""TransformerConfig validation and TransformerLM behaviour beyond conversion."""
import math

import pytest
import torch

from lit_icl import TransformerConfig, TransformerLM

V = 30


def cfg(**kw):
    base = dict(vocab_size=V, n_layer=2, n_head=2, n_embd=16, block_size=32, chunk_size=4)
    return TransformerConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(n_embd=10, n_head=3), "n_embd=10 must be divisible by n_head=3"),
        (dict(attention="flash"), "attention='flash'; allowed"),
        (dict(feature_map="cosh"), "feature_map='cosh'; allowed"),
        (dict(position="alibi"), "position='alibi'; allowed"),
        (dict(momentum=1.0), r"momentum=1.0 must be in \[0, 1\)"),
        (dict(momentum=-0.1), r"momentum=-0.1 must be in \[0, 1\)"),
        (dict(vocab_size=0), "vocab_size=0 must be a positive integer"),
        (dict(block_size=2.5), "block_size=2.5 must be a positive integer"),
        (dict(chunk_size=0), "chunk_size=0 must be a positive integer"),
        (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
        (dict(n_embd=6, n_head=2, position="rope"), "rope' needs an even head size, got 3"),
    ],
)
def test_config_errors_name_the_field(kw, message):
    with pytest.raises(ValueError, match=message):
        cfg(**kw)


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_logits_shape_and_chunk_size_invariance(attention):
    torch.manual_seed(0)
    model = TransformerLM(cfg(attention=attention, momentum=0.3)).double()
    x = torch.randint(0, V, (3, 19))
    ref = model(x)
    assert ref.shape == (3, 19, V)
    for chunk in (1, 7, 64):
        model.config.chunk_size = chunk
        torch.testing.assert_close(model(x), ref, rtol=1e-10, atol=1e-10)


def test_causal():
    """Changing a later token never changes earlier logits."""
    for attention in ("linear", "softmax"):
        torch.manual_seed(0)
        model = TransformerLM(cfg(attention=attention, momentum=0.5, position="rope")).double()
        x = torch.randint(0, V, (1, 12))
        y = x.clone()
        y[0, 8] = (y[0, 8] + 1) % V
        torch.testing.assert_close(model(x)[:, :8], model(y)[:, :8], rtol=0, atol=0)


def test_attention_outputs_and_scores_on_request():
    torch.manual_seed(0)
    model = TransformerLM(cfg(attention="softmax")).double()
    x = torch.randint(0, V, (2, 7))
    out = model.run(x, need_attn=True)
    assert len(out.attn_outputs) == len(out.attn_scores) == 2
    assert out.attn_outputs[0].shape == (2, 7, 16) and out.attn_scores[0].shape == (2, 2, 7)
    # layer 0 scores are q_last . k / sqrt(d) computed by hand
    attn = model.blocks[0].attn
    h = model.blocks[0].ln_1(model.wte(x) + model.wpe(torch.arange(7)))
    q = attn.q_proj(h).view(2, 7, 2, 8).transpose(1, 2)
    k = attn.k_proj(h).view(2, 7, 2, 8).transpose(1, 2)
    expected = (q[:, :, -1:] @ k.transpose(-1, -2))[:, :, 0] / math.sqrt(8)
    torch.testing.assert_close(out.attn_scores[0], expected)
    assert model.run(x).attn_outputs == []  # nothing collected unless asked


def test_linear_scores_are_the_kernel():
    torch.manual_seed(0)
    model = TransformerLM(cfg(attention="linear", position="none")).double()
    x = torch.randint(0, V, (1, 5))
    out = model.run(x, need_attn=True)
    attn = model.blocks[0].attn
    h = model.blocks[0].ln_1(model.wte(x))
    q = attn.phi(attn.q_proj(h).view(1, 5, 2, 8).transpose(1, 2))
    k = attn.phi(attn.k_proj(h).view(1, 5, 2, 8).transpose(1, 2))
    torch.testing.assert_close(out.attn_scores[0], (q[:, :, -1:] @ k.transpose(-1, -2))[:, :, 0])
    assert (out.attn_scores[0] > 0).all()


def test_bad_inputs():
    model = TransformerLM(cfg())
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 30\), got \[0, 30\]"):
        model(torch.tensor([[0, 30]]))
    with pytest.raises(ValueError, match="must be a \\[B, T\\] long tensor"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="more than block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 4))
    with pytest.raises(TypeError, match="TransformerConfig"):
        TransformerLM({"vocab_size": 3})


def test_weight_tying_and_gradients_flow():
    model = TransformerLM(cfg(momentum=0.5, feature_map="taylor"))
    assert model.lm_head.weight is model.wte.weight
    assert TransformerLM(cfg(tie_weights=False)).lm_head.weight is not None
    x = torch.randint(0, V, (2, 9))
    model(x).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
