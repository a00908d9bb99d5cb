"""LitTransformerLM: optimizer groups, LR schedule, metrics, checkpoint round trip."""

import math
from dataclasses import asdict

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lit_icl.module import LitTransformerLM, lr_lambda


def test_lr_lambda_warmup_then_cosine():
    f = lambda s: lr_lambda(s, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)  # noqa: E731
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    decay = [f(s) for s in range(4, 15)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert lr_lambda(50, warmup_steps=0, total_steps=None, min_lr_ratio=0.1) == 1.0
    assert lr_lambda(0, warmup_steps=0, total_steps=10, min_lr_ratio=0.1) == 1.0


class _RecordLR(pl.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, *args):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_optimizer_groups_and_stepped_schedule(tiny_config, tiny_data, make_trainer):
    module = LitTransformerLM(tiny_config, lr=1e-2, weight_decay=0.2, warmup_steps=2, min_lr_ratio=0.1)
    record = _RecordLR()
    trainer = make_trainer(max_steps=6, callbacks=[record], limit_val_batches=0)
    trainer.fit(module, tiny_data)
    decay, no_decay = trainer.optimizers[0].param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.2, 0.0)
    named = dict(module.model.named_parameters())
    by_id = {id(p): name for name, p in named.items()}
    decayed = {by_id[id(p)] for p in decay["params"]}
    kept = {by_id[id(p)] for p in no_decay["params"]}
    assert decayed | kept == set(named) and not decayed & kept
    assert decayed == {n for n, p in named.items() if p.dim() >= 2}
    assert "wte.weight" in decayed and any(n.endswith("attn.q_proj.weight") for n in decayed)
    assert all(n.endswith("bias") or ".ln_" in n or n.startswith("ln_") for n in kept)
    want = [1e-2 * lr_lambda(s, 2, 6, 0.1) for s in range(6)]
    assert record.lrs == pytest.approx(want)
    assert decay["lr"] == pytest.approx(1e-3)  # after the last step: min_lr_ratio * lr


def test_validation_metrics_are_token_weighted(tiny_config, tiny_data, make_trainer):
    module = LitTransformerLM(tiny_config)
    (metrics,) = make_trainer().validate(module, tiny_data, verbose=False)
    tiny_data.setup()
    x, y = tiny_data._splits[1].tensors
    with torch.no_grad():
        logits = module.model(x)
    mask = y != -100
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    acc = (logits.argmax(-1) == y)[mask].float().mean()
    assert metrics["val/loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-5)
    assert metrics["val/acc"] == pytest.approx(acc.item(), abs=1e-6)
    (tested,) = make_trainer().test(module, tiny_data, verbose=False)
    assert set(tested) == {"test/loss", "test/ppl", "test/acc"}


def test_checkpoint_round_trip_gives_identical_logits(tiny_config, tiny_data, make_trainer, tmp_path):
    module = LitTransformerLM(tiny_config, lr=5e-3)
    trainer = make_trainer(max_steps=3, limit_val_batches=0)
    trainer.fit(module, tiny_data)
    path = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)  # loads without unpickling any custom class
    assert ckpt["hyper_parameters"]["config"] == asdict(tiny_config)
    loaded = LitTransformerLM.load_from_checkpoint(path)
    assert loaded.config == tiny_config and loaded.hparams.lr == 5e-3
    ids = tiny_data.sequences(4, 1)[0]
    module.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids), module(ids))


def test_config_forms_and_errors(tiny_config):
    assert LitTransformerLM(asdict(tiny_config)).config == tiny_config
    with pytest.raises(ValueError, match="n_head"):
        LitTransformerLM({**asdict(tiny_config), "n_head": 3})
    with pytest.raises(TypeError, match="TransformerConfig"):
        LitTransformerLM(7)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        LitTransformerLM(tiny_config, min_lr_ratio=2.0)


@pytest.mark.parametrize("chunk", [None, 5, 1000])
def test_chunked_loss_equals_the_full_logits_reference(tiny_config, chunk):
    """The training loss, its gradients and the predictions through the chunked head
    (lit_icl.loss, inside the model's forward) equal the full logits' F.cross_entropy, float64."""
    torch.manual_seed(0)
    ref = LitTransformerLM(tiny_config, loss_chunk_size=0).double()
    mod = LitTransformerLM(tiny_config, loss_chunk_size=chunk).double()
    mod.load_state_dict(ref.state_dict())
    ids = torch.randint(0, tiny_config.vocab_size, (3, 11))
    labels = torch.randint(0, tiny_config.vocab_size, (3, 11))
    labels[0, :4] = -100
    batch = {"input_ids": ids, "labels": labels}
    (loss_a, pred_a), (loss_b, pred_b) = ref._loss_and_predictions(batch), mod._loss_and_predictions(batch)
    loss_a.backward()
    loss_b.backward()
    assert float(loss_b) == pytest.approx(float(loss_a), rel=1e-12) and torch.equal(pred_a, pred_b)
    for (name, a), b in zip(ref.named_parameters(), mod.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-13, msg=name)
    with pytest.raises(ValueError, match="loss_chunk_size=-1"):
        LitTransformerLM(tiny_config, loss_chunk_size=-1)
