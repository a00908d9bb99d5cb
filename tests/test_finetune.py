"""The finetuning baseline: batched (vmap) against the one-episode reference loop."""
import pytest
import torch

from lit_icl.finetune import finetune, finetune_batched, finetuned_logits, lm_loss, trainable_names
from tests.conftest import tiny_model

V = 24


def model(attention="linear", **kw):
    return tiny_model(vocab_size=V, block_size=32, chunk_size=32, attention=attention, **kw).train()


def demos(N=3, D=4, L=3, seed=0):
    return torch.randint(1, V, (N, D, L), generator=torch.Generator().manual_seed(seed))


def test_kv_only_and_source_untouched():
    m = model()
    before = {n: p.clone() for n, p in m.named_parameters()}
    tuned = finetune(m, demos()[0], lr=0.5)
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n])
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(trainable_names(m, "kv"))
    assert all("k_proj" in n or "v_proj" in n for n in changed) and len(changed) == 8


def test_reference_is_plain_sgd_batch_size_one():
    """Two demonstrations, two hand-made SGD steps on the kv parameters."""
    m, d = model(), demos(1, 2, 3)[0]
    tuned = finetune(m, d, lr=0.3)
    ref = model()
    names = trainable_names(ref, "kv")
    for j in range(2):
        loss = lm_loss(ref(d[j : j + 1]), d[j : j + 1], None)
        grads = torch.autograd.grad(loss, [dict(ref.named_parameters())[n] for n in names])
        with torch.no_grad():
            for n, g in zip(names, grads):
                dict(ref.named_parameters())[n].sub_(0.3 * g)
    for n in names:
        torch.testing.assert_close(dict(tuned.named_parameters())[n], dict(ref.named_parameters())[n])


@pytest.mark.parametrize("attention,params", [("linear", "kv"), ("linear", "all"), ("softmax", "attention"),
                                              ("retention", "kv"), ("simple_gla", "all"), ("gla", "all"),
                                              ("deltanet", "attention"), (["gla", "softmax"], "kv")])
def test_batched_equals_loop(attention, params):
    m, d = model(attention, momentum=0.4), demos()
    mask = torch.ones_like(d)
    mask[1, :, 0] = 0  # episode 1's demonstrations are left-padded by one token
    weights = finetune_batched(m, d, mask, params=params, lr=0.2, epochs=2)
    query = torch.randint(1, V, (3, 2), generator=torch.Generator().manual_seed(5))
    batched = finetuned_logits(m, weights, query)[0]
    for i in range(3):
        tuned = finetune(m, d[i], mask[i], params=params, lr=0.2, epochs=2)
        for n, w in weights.items():
            torch.testing.assert_close(w[i], dict(tuned.named_parameters())[n], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(batched[i], tuned(query[i : i + 1])[0], rtol=1e-9, atol=1e-11)


def test_attention_outputs_of_finetuned_copies():
    m, d = model(), demos()
    weights = finetune_batched(m, d, lr=0.2)
    query = torch.randint(1, V, (3, 4))
    logits, outputs, scores = finetuned_logits(m, weights, query, need_attn=True)
    tuned = finetune(m, d[2], lr=0.2)
    out = tuned.run(query[2:3], need_attn=True)
    torch.testing.assert_close(logits[2], out.logits[0])
    torch.testing.assert_close(outputs[1][2], out.attn_outputs[1][0])
    torch.testing.assert_close(scores[0][2], out.attn_scores[0][0])


def test_works_under_inference_mode():
    """Lightning validates under torch.inference_mode; finetuning must still get gradients."""
    m = model()
    with torch.inference_mode():
        d = demos()
        weights = finetune_batched(m, d, lr=0.2)
        tuned = finetune(m, d[0], lr=0.2)
    name = trainable_names(m, "kv")[0]
    torch.testing.assert_close(weights[name][0], dict(tuned.named_parameters())[name])
    assert not torch.equal(weights[name][0], dict(m.named_parameters())[name])


def test_bad_arguments():
    m = model()
    with pytest.raises(ValueError, match="params='bias'; allowed"):
        finetune(m, demos()[0], params="bias")
    with pytest.raises(ValueError, match="2-D long tensor"):
        finetune(m, demos())
    with pytest.raises(ValueError, match="lr=0"):
        finetune_batched(m, demos(), lr=0)
