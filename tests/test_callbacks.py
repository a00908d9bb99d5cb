"""ICLConversionCallback inside a real Trainer: logged metrics, exactness, TensorBoard event
files, and that the training run is left exactly as it would have been without it."""
import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lit_icl.callbacks import ICLConversionCallback, format_summary
from lit_icl.evaluation import EpisodeRuns, conversions
from lit_icl.data import AssociativeRecallDataModule
from lit_icl.finetune import finetune
from lit_icl.mixers import MIXERS, SoftmaxAttention
from tests.conftest import HYBRIDS, min_candidate_margin, model_config, setting_id
from lit_icl.module import LitTransformerLM

HERE = Path(__file__).resolve().parent


def tiny(attention="linear", seed=0, **kw):
    dm = AssociativeRecallDataModule(n_pairs=4, n_keys=8, n_values=8, n_queries=2, num_train=64,
                                     num_val=16, num_heldout=24, batch_size=16)
    cfg = model_config(dm.vocab_size, block_size=32, chunk_size=32, attention=attention, **kw)
    torch.manual_seed(seed)
    return LitTransformerLM(cfg), dm


def trainer(tmp_path, callbacks=(), logger=False, **kw):
    kw = {"max_steps": 4, "val_check_interval": 2, **kw}
    return pl.Trainer(logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks), **kw)


def sharpen_softmax(module: LitTransformerLM, factor: float) -> None:
    """Scale the softmax layers' query and key projections by `factor` (scores by factor^2).
    An untrained tiny model's scores q.k/sqrt(d) are about 1e-2, where ICLAA's Taylor map
    1 + s + s^2/2 is exp(s) to float32 rounding; at scores of order one it visibly is not."""
    with torch.no_grad():
        for block in module.model.blocks:
            if isinstance(block.attn, SoftmaxAttention):
                block.attn.q_proj.weight.mul_(factor)
                block.attn.k_proj.weight.mul_(factor)


@pytest.mark.parametrize("attention", [*MIXERS, *HYBRIDS], ids=setting_id)
def test_callback_logs_every_metric_per_shot_count(tmp_path, attention):
    module, dm = tiny(attention, momentum=0.5)
    sharpen_softmax(module, 8.0)
    cb = ICLConversionCallback(shots=[0, 1, 4], batch_size=10)
    t = trainer(tmp_path, [cb])
    t.fit(module, datamodule=dm)
    assert cb.validations == 2 and set(cb.results) == {0, 1, 4}
    assert module.training
    conv = conversions(module.model)[0].name  # converted, or converted_<mode> (softmax: converted_kv)
    for k in (0, 1, 4):
        row = cb.results[k]
        assert row["rel_logit_err"] < 1e-5  # exact conversion: float32 rounding
        # same accuracy, by a margin: no episode's best two candidates are within the logit error
        margin = min_candidate_margin(module.model, dm.heldout_episodes(k))
        assert margin > 100 * row["max_abs_logit_diff"], (margin, row["max_abs_logit_diff"])
        assert row["prompted_acc"] == row[f"{conv}_acc"]
        for name in ("zero_shot_acc", "finetuned_acc", "rec2ftp", "simaou", "simaou_random",
                     "simam_icl_ft", "simam_icl_zsl", "max_abs_logit_diff"):
            assert f"icl/{name}/k={k}" in t.callback_metrics, name
    zero = cb.results[0]  # no demonstrations: all four predictions are the query alone
    assert zero["zero_shot_acc"] == zero["prompted_acc"] == zero["finetuned_acc"]
    if "softmax" in attention:  # approximate conversion next to the exact KV prefix
        for mode in ("taylor", "prf"):
            assert f"icl/converted_{mode}_acc/k=4" in t.callback_metrics
            # at scores of order one (sharpen_softmax) the approximation loses information: its
            # error is above 1e-4, a thousand times the exact path's float32 rounding (about 1e-7)
            assert cb.results[4][f"rel_logit_err_{mode}"] > 1e-4
            assert f"rel err {mode}" in format_summary(cb.results)
    assert "icl/eval_seconds" in t.callback_metrics and "hp/prompted_acc" in t.callback_metrics
    assert f"{conv.replace('_', ' ')}" in format_summary(cb.results)


def test_episode_runs_match_direct_calls():
    module, dm = tiny(momentum=0.3)
    model = module.model.double().eval()
    eps = dm.heldout_episodes(3, 5)
    runs = EpisodeRuns(model, eps, dict(params="kv", lr=0.5, epochs=1), check=True)
    whole = model(eps.prompts)[:, -1]  # the prompt in one pass, by hand
    # the prompted prediction continues the demonstrations' state: the one pass, to float64 rounding
    torch.testing.assert_close(runs.logits["prompted"][:, 0], whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(runs.one_pass[:, 0], whole)
    torch.testing.assert_close(runs.logits["zero_shot"][:, 0], model(eps.query_ids)[:, -1])
    assert runs.logits["converted"] is runs.logits["prompted"]  # the exact state is the prompted pass's
    demos, _ = eps.demonstrations()
    for i in range(5):  # the batched finetuning equals the one-episode reference
        tuned = finetune(model, demos[i], lr=0.5)
        torch.testing.assert_close(runs.logits["finetuned"][i, 0], tuned(eps.query_ids[i : i + 1])[0, -1])
    assert len(runs.outputs["finetuned"]) == 2 and runs.outputs["finetuned"][0].shape == (5, 16)
    assert runs.scores["prompted"][1].shape == runs.scores["finetuned"][1].shape == (5, 2, 1)


def test_training_is_untouched_by_the_callback(tmp_path):
    """Same seed, with and without the callback: identical weights and optimizer state after
    training, so the callback changed no parameter, no mode and no RNG draw of the data."""
    finals = []
    for callbacks in ([], [ICLConversionCallback(shots=[2, 4], batch_size=8)]):
        pl.seed_everything(3)
        module, dm = tiny(dropout=0.1)
        t = trainer(tmp_path, callbacks, max_steps=6)
        t.fit(module, datamodule=dm)
        finals.append((module.state_dict(), t.optimizers[0].state_dict()["state"]))
    (w0, o0), (w1, o1) = finals
    assert all(torch.equal(w0[n], w1[n]) for n in w0)
    assert all(torch.equal(o0[i]["exp_avg"], o1[i]["exp_avg"]) for i in o0)


def test_tensorboard_event_files_hold_scalars_hparams_and_figure(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module, dm = tiny()
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    trainer(tmp_path, [ICLConversionCallback(shots=[1, 2])], logger=logger).fit(module, datamodule=dm)
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = acc.Tags()
    for tag in ("icl/prompted_acc/k=2", "icl/finetuned_acc/k=1", "icl/simaou/k=2", "hp/prompted_acc",
                "icl/eval_seconds", "val/loss"):
        assert tag in tags["scalars"], tag
    assert len(acc.Scalars("icl/prompted_acc/k=2")) == 2  # one point per evaluation
    assert "icl/accuracy_vs_shots" in tags["images"]
    assert acc.Images("icl/accuracy_vs_shots")[-1].width > 100
    plugins = acc.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in plugins and "_hparams_/session_start_info" in plugins
    assert b"hp/prompted_acc" in plugins["_hparams_/experiment"]


@pytest.mark.slow
def test_ddp_two_processes_give_the_one_process_values(tmp_path):
    out = {}
    for devices in (1, 2):
        path = tmp_path / f"icl_{devices}.json"
        proc = subprocess.run([sys.executable, str(HERE / "icl_ddp_worker.py"), str(devices), str(path)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[devices] = json.loads(path.read_text())
    assert out[1].keys() == out[2].keys()
    for k in out[1]:
        for name, value in out[1][k].items():
            # float64: the conversion error is rounding itself (about 1e-16), which depends on batch shapes
            tol = 1e-12 if name in ("max_abs_logit_diff", "rel_logit_err") else 1e-9
            assert out[2][k][name] == pytest.approx(value, rel=1e-6, abs=tol, nan_ok=True), (k, name)


def test_bad_arguments():
    with pytest.raises(ValueError, match="shots"):
        ICLConversionCallback(shots=[])
    with pytest.raises(ValueError, match="every_n_validations=0"):
        ICLConversionCallback(every_n_validations=0)


def test_episode_runs_with_padded_demonstrations_and_queries():
    """Variable-length episodes (padding in demonstrations and queries) give, row by row, the
    numbers of the same episode run alone without padding."""
    from lit_icl.data import Episodes

    module, _ = tiny(momentum=0.4, token_shift=True)
    model = module.model.double().eval()
    demo = torch.tensor([[3, 4, 5, 6, 7], [0, 0, 8, 9, 10]])
    index = torch.tensor([[0, 0, 1, 1, 1], [-1, -1, 0, 1, 1]])
    query = torch.tensor([[11, 2], [0, 12]])
    qmask = torch.tensor([[1, 1], [0, 1]])
    eps = Episodes(demo, query, torch.tensor([9, 10]), torch.tensor([9, 10, 11]), index, qmask)
    kw = dict(params="kv", lr=0.5, epochs=1)
    runs = EpisodeRuns(model, eps, kw, check=True)
    torch.testing.assert_close(runs.one_pass, runs.logits["prompted"], rtol=1e-10, atol=1e-10)
    for i in range(2):
        d = demo[i][index[i] >= 0][None]
        q = query[i][qmask[i] > 0][None]
        alone = Episodes(d, q, eps.answers[i : i + 1], eps.candidates, index[i][index[i] >= 0][None])
        ref = EpisodeRuns(model, alone, kw)
        for name in ("zero_shot", "prompted", "converted", "finetuned"):
            torch.testing.assert_close(runs.logits[name][i], ref.logits[name][0], rtol=1e-9, atol=1e-10)


def test_mixture_reports_each_task(tmp_path):
    from lit_icl.data import LabelMappingDataModule, MixtureDataModule

    small = dict(num_train=32, num_val=8, num_heldout=12, batch_size=8)
    recall = AssociativeRecallDataModule(n_pairs=4, n_keys=8, n_values=8, n_queries=2, **small)
    dm = MixtureDataModule([recall, LabelMappingDataModule(**small)], **small)
    cfg = model_config(dm.vocab_size, block_size=dm.seq_len + 8, chunk_size=32)
    cb = ICLConversionCallback(shots=[1, 2], batch_size=6)
    t = trainer(tmp_path, [cb])
    t.fit(LitTransformerLM(cfg), datamodule=dm)
    trainer_metrics = lambda _: t.callback_metrics
    tasks = dm.heldout_tasks()
    assert len(tasks) == 2 and set(cb.task_results) == set(tasks)
    assert all(set(r) == {1, 2} for r in cb.task_results.values())
    for task in tasks:
        assert f"icl/{task}/prompted_acc/k=2" in trainer_metrics(cb)
