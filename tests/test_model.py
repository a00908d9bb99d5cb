"""TransformerConfig validation and TransformerLM behaviour beyond conversion."""
import math

import pytest
import torch

from lit_icl import TransformerConfig, TransformerLM
from lit_icl.mixers import MIXERS
from lit_icl.ops import delta_rule_recurrent, gla_recurrent
from tests.conftest import HYBRIDS, model_config, setting_id

V = 30


def cfg(**kw):
    return model_config(**{"vocab_size": V, "block_size": 32, **kw})


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
        (dict(attention=["gla", "softmax", "gla"]), "names 3 layers; n_layer=2 needs one kind per layer"),
        (dict(attention=["gla", "mamba"]), "attention='mamba'; allowed"),
        (dict(attention="linear", qk_norm="l2"), "qk_norm='l2' applies to the recurrent kinds only"),
        (dict(attention="deltanet", qk_norm="none"), r"qk_norm='none' is not available for deltanet attention; allowed: \['l2'\]"),
        (dict(attention="gla", qk_norm="rms"), r"qk_norm='rms' is not available for gla attention; allowed: \['l2', 'none'\]"),
        (dict(attention="gla", n_kv_head=1), "n_kv_head=1 .grouped-query attention. needs attention='softmax'"),
    ],
)
def test_config_errors_name_the_field(kw, message):
    with pytest.raises(ValueError, match=message):
        cfg(**kw)


KINDS = [*MIXERS, *HYBRIDS]


@pytest.mark.parametrize("attention", KINDS, ids=setting_id)
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
    for attention in KINDS:
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


@pytest.mark.parametrize("attention", ["retention", "simple_gla", "gla", "deltanet"])
def test_recurrent_scores_are_the_weights_of_the_parallel_form(attention):
    """The last output of the recurrence, before its output norm, is sum_i score_i v_i: the
    scores SimAM compares are the weights the recurrent layer gives each earlier token (gated
    kinds: q.k times the decay since the key; DeltaNet: q.k over its written values)."""
    torch.manual_seed(0)
    model = TransformerLM(cfg(attention=attention, position="none")).double()
    x = torch.randint(0, V, (2, 9))
    scores = model.run(x, need_attn=True).attn_scores[0]
    attn, h = model.blocks[0].attn, model.blocks[0].ln_1(model.wte(x))
    q, k, v = (p(h).view(2, 9, 2, 8).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = attn.featurize(q, k, None)
    if attention == "deltanet":  # the written values u_i = S_i^T k_i - S_{i-1}^T k_i, i.e. v_i -> beta_i (v_i - S^T k_i)
        beta = attn.b_proj(h).sigmoid().transpose(1, 2)
        o, _ = delta_rule_recurrent(q, k, v, beta)
        S = [delta_rule_recurrent(q[:, :, :t], k[:, :, :t], v[:, :, :t], beta[:, :, :t])[1] for t in range(10)]
        v = torch.stack([((S[t + 1] - S[t]) * k[:, :, t, :, None]).sum(2) for t in range(9)], 2)
    else:
        g = attn.gates(h, None)
        o, _ = gla_recurrent(q, k, v, g if g.dim() == 4 else g[..., None].expand_as(k))
    torch.testing.assert_close((scores[..., None] * v).sum(2), o[:, :, -1], rtol=1e-10, atol=1e-12)


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


def test_shift_tokens_skips_padding_and_carries_the_last_token():
    from lit_icl.model import shift_tokens

    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 0, 9]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 1]]).bool()
    previous, last = shift_tokens(ids, mask, torch.tensor([3, -1]))
    assert previous[:, 2:].tolist() == [[3, 5], [8, 8]] and previous[1, :2].tolist() == [-1, 7]
    assert last.tolist() == [6, 9]
    previous, last = shift_tokens(ids, None, torch.tensor([3, -1]))
    assert previous.tolist() == [[3, 0, 0, 5], [-1, 7, 8, 0]] and last.tolist() == [6, 9]


def test_token_shift_changes_the_input_only_through_the_previous_token():
    torch.manual_seed(0)
    model = TransformerLM(cfg(token_shift=True, position="none")).double()
    x = torch.randint(0, V, (1, 6))
    out = model.run(x)
    assert out.last_token.tolist() == [int(x[0, -1])]
    y = x.clone()
    y[0, 2] = (y[0, 2] + 1) % V  # changes position 2 directly and position 3 through the shift
    diff = (model(x) - model(y)).abs().amax(-1)[0]
    assert (diff[:2] == 0).all() and (diff[2:] > 0).all()
