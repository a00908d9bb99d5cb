"""Llama-family checkpoints: tiny random transformers LlamaForCausalLM models (grouped-query
and not, tied and untied head, non-default rope_theta and rms_norm_eps), saved with
save_pretrained and loaded with TransformerLM.from_hf, give transformers' logits and greedy
tokens; everything a softmax model does (KV-prefix conversion, the approximate modes, bake,
ContextState files, decoding, finetuning, the Lightning module and CLI) works on them."""
import copy
import dataclasses
import json
import shutil

import pytest
import torch

from lit_icl import ContextState, TransformerConfig, TransformerLM, bake, convert
from lit_icl.finetune import finetune, finetune_batched, finetuned_logits, trainable_names
from lit_icl.generate import generate
from lit_icl.module import LitTransformerLM
from tests.conftest import min_candidate_margin, naive_greedy

transformers = pytest.importorskip("transformers", reason="transformers is a test-only dependency (pip install -e '.[dev]')")

V = 97
LLAMAS = {  # name -> LlamaConfig arguments beside the shared tiny sizes
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500.0, rms_norm_eps=1e-5),
    "mha-untied": dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=50000.0, rms_norm_eps=1e-6),
    "mqa-untied": dict(num_key_value_heads=1, tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-3),
}


def hf_llama(name: str, seed: int = 0):
    """A random tiny transformers Llama; weights drawn wide enough (std 0.2) that attention is far
    from uniform, and norm weights away from 1 so that swapping two norms would show."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64, initializer_range=0.2,
                                      **LLAMAS[name])
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """name -> (directory written by save_pretrained, the transformers model)."""
    out = {}
    for name in LLAMAS:
        path = tmp_path_factory.mktemp(name)
        model = hf_llama(name)
        model.save_pretrained(path)
        out[name] = (path, model)
    return out


def tokens(*shape, seed=1):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", LLAMAS)
def test_logits_match_transformers(llama_dirs, name):
    path, ref = llama_dirs[name]
    model = TransformerLM.from_hf(path)
    cfg, args = model.config, LLAMAS[name]
    assert (cfg.norm, cfg.mlp, cfg.position, cfg.bias, cfg.mlp_hidden) == ("rmsnorm", "swiglu", "rope", False, 48)
    assert cfg.kv_heads == args["num_key_value_heads"] and cfg.rope_theta == args["rope_theta"]
    assert cfg.norm_eps == args["rms_norm_eps"] and cfg.tie_weights == args["tie_word_embeddings"]
    assert (model.lm_head.weight is model.wte.weight) == cfg.tie_weights
    assert model.blocks[0].attn.k_proj.weight.shape == (8 * cfg.kv_heads, 32)
    ids = tokens(3, 40)
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids).logits
    assert rel(ours, theirs) < 1e-4
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


def test_config_layouts_and_unsupported_checkpoints(llama_dirs, tmp_path):
    path, ref = llama_dirs["mha-untied"]
    hf = json.loads((path / "config.json").read_text())
    older = tmp_path / "older"  # transformers < 5: rope_theta at the top level
    shutil.copytree(path, older)
    flat = {k: v for k, v in hf.items() if k != "rope_parameters"} | {"rope_theta": 50000.0, "rope_scaling": None}
    (older / "config.json").write_text(json.dumps(flat))
    model = TransformerLM.from_hf(older)
    assert model.config.rope_theta == 50000.0
    ids = tokens(1, 30)
    with torch.no_grad():
        assert rel(model(ids), ref(ids).logits) < 1e-4
    bad = tmp_path / "bad"
    bad.mkdir()
    for config, message in [
        ({**hf, "model_type": "mistral"},
         r"model_type='mistral' is not supported; supported: \['gemma3', 'gemma3_text', 'gpt2', 'llama', 'qwen2'\]"),
        ({**hf, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_type='llama3'"),
        ({**hf, "hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({**hf, "layer_types": ["chunked_attention"] * 2}, "layer_types=.*chunked_attention"),
        ({**hf, "layer_types": ["sliding_attention"] * 2, "sliding_window": None}, "sliding_window is not set"),
    ]:
        (bad / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message):
            TransformerLM.from_hf(bad)
    with pytest.raises(ValueError, match="only GPT-2"):
        TransformerLM.from_hf_gpt2(path)
    untied_without_head = tmp_path / "headless"
    untied_without_head.mkdir()
    (untied_without_head / "config.json").write_text(json.dumps(hf))
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path / "model.safetensors"))
    save_file({k: t for k, t in weights.items() if k != "lm_head.weight"}, str(untied_without_head / "model.safetensors"))
    with pytest.raises(ValueError, match="no lm_head.weight"):
        TransformerLM.from_hf(untied_without_head)


@pytest.mark.parametrize(
    "kw, message",
    [(dict(n_kv_head=3), "n_head=4 must be divisible by n_kv_head=3"),
     (dict(n_kv_head=2, attention="linear"), "n_kv_head=2 .* needs attention='softmax'"),
     (dict(norm="batchnorm"), "norm='batchnorm'; allowed"), (dict(mlp="relu"), "mlp='relu'; allowed"),
     (dict(mlp_hidden=0), "mlp_hidden=0 must be a positive integer"),
     (dict(rope_theta=0.0), "rope_theta=0.0 must be a positive number"),
     (dict(norm_eps=-1e-5), "norm_eps=-1e-05 must be a positive number")],
)
def test_new_config_fields_are_validated(kw, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(vocab_size=V, n_head=4, n_embd=32, attention=kw.pop("attention", "softmax"), **kw)


@pytest.mark.parametrize("name", LLAMAS)
def test_kv_prefix_conversion_is_exact(llama_dirs, name):
    model = TransformerLM.from_hf(llama_dirs[name][0]).double()
    demo, more, query = tokens(2, 15), tokens(2, 6, seed=2), tokens(2, 7, seed=3)
    prompted = model(torch.cat([demo, more, query], 1))[:, 21:]
    state = convert(model, demo)
    assert state.layers[0].mixer.k.shape == (2, model.config.kv_heads, 15, 8)
    step = convert(model, more, state=state)
    torch.testing.assert_close(model(query, state=step), prompted, rtol=1e-10, atol=1e-10)
    whole = convert(model, torch.cat([demo, more], 1))
    torch.testing.assert_close(bake(model, whole)(query), prompted, rtol=1e-10, atol=1e-10)
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[1, :5] = 0  # row 1: a shorter, left-padded context continues at its own offset
    padded = convert(model, torch.cat([demo, more], 1), attention_mask=mask)
    alone = model(torch.cat([demo[1:, 5:], more[1:], query[1:]], 1))[:, 16:]
    torch.testing.assert_close(model(query, state=padded)[1:], alone, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grouped_query_with_momentum_and_token_shift_converts_exactly(dtype):
    """A Llama-style model built from a config, with the momentum EMA (kept per key/value head)
    and token shift: prompted == converted, incremental, padded rows, decoding."""
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=64, chunk_size=4,
                            attention="softmax", position="rope", rope_theta=300.0, norm="rmsnorm", mlp="swiglu",
                            mlp_hidden=40, bias=False, tie_weights=False, momentum=0.6, token_shift=True)
    model = TransformerLM(cfg).to(dtype).eval()
    a, b, query = tokens(3, 11), tokens(3, 6, seed=2), tokens(3, 5, seed=3)
    prompted = model(torch.cat([a, b, query], 1))[:, 17:]
    state = convert(model, b, state=convert(model, a))
    assert state.layers[1].momentum.m.shape == (3, 2, 8)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(model(query, state=state), prompted, rtol=tol, atol=tol)
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[0, :4] = 0
    padded = model(query, state=convert(model, torch.cat([a, b], 1), attention_mask=mask))[:1]
    alone = model(torch.cat([a[:1, 4:], b[:1], query[:1]], 1))[:, 13:]
    torch.testing.assert_close(padded, alone, rtol=tol, atol=tol)
    if dtype == torch.float64:
        expected = naive_greedy(model, torch.cat([a, b, query], 1), 8)
        assert torch.equal(generate(model, torch.cat([a, b, query], 1), 8), expected)
        assert torch.equal(generate(model, query, 8, state=state), expected)


def test_context_file_round_trip_and_head_check(llama_dirs, tmp_path):
    model = TransformerLM.from_hf(llama_dirs["gqa-tied"][0])
    state = convert(model, tokens(2, 9))
    state.save(tmp_path / "ctx.safetensors", model)
    loaded = ContextState.load(tmp_path / "ctx.safetensors", model)
    query = tokens(2, 4, seed=5)
    assert torch.equal(model(query, state=loaded), model(query, state=state))
    mha = TransformerLM.from_hf(llama_dirs["mha-untied"][0])
    with pytest.raises(ValueError, match="another model.*n_kv_head"):
        ContextState.load(tmp_path / "ctx.safetensors", mha)


def repeated_heads(model: TransformerLM) -> TransformerLM:
    """The multi-head model equivalent to a grouped-query one: each key/value head's
    projection rows copied for every query head of its group."""
    cfg = model.config
    groups = cfg.n_head // cfg.kv_heads
    mha = TransformerLM(dataclasses.replace(cfg, n_kv_head=None)).to(next(model.parameters()).dtype)
    state = model.state_dict()
    for name, t in state.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            state[name] = t.view(cfg.kv_heads, 1, cfg.head_dim, -1).expand(-1, groups, -1, -1).reshape(cfg.n_embd, -1)
    mha.load_state_dict(state)
    return mha.eval()


@pytest.mark.parametrize("mode", ["taylor", "prf"])
def test_grouped_query_approximate_conversion_equals_repeated_heads(llama_dirs, mode):
    """ICLAA on a grouped-query model: query heads share their key head's feature-map sums
    (and random features), so it equals ICLAA on the multi-head model with repeated k/v heads."""
    gqa = TransformerLM.from_hf(llama_dirs["gqa-tied"][0]).double()
    mha = repeated_heads(gqa)
    demo, query = tokens(2, 12), tokens(2, 5, seed=4)
    torch.testing.assert_close(mha(query), gqa(query), rtol=1e-10, atol=1e-10)
    state = convert(gqa, demo, mode=mode, num_features=64)
    assert state.layers[0].mixer.S.shape[:2] == (2, 2)
    wide = ContextState([layer.map(lambda t: t.repeat_interleave(2, dim=1)) for layer in state.layers],
                        state.offset, state.last_token, mode)
    torch.testing.assert_close(gqa(query, state=state), mha(query, state=wide), rtol=1e-10, atol=1e-10)
    expected = naive_greedy(gqa, query, 6, state=state)
    assert torch.equal(generate(gqa, query, 6, state=state), expected)
    assert torch.equal(generate(mha, query, 6, state=wide), expected)


def test_approximate_conversion_beats_no_context():
    """With small scores q.k/sqrt(d) (query projections scaled down), ICLAA's second-order
    Taylor context is much closer to the prompted logits than dropping the context."""
    hf = hf_llama("gqa-tied")
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.mul_(0.2)
    model = TransformerLM.from_hf_state(hf.config.to_dict(), hf.state_dict()).double()
    demo, query = tokens(2, 30), tokens(2, 6, seed=2)
    prompted = model(torch.cat([demo, query], 1))[:, 30:]
    err = lambda logits: ((logits - prompted).norm() / prompted.norm()).item()  # noqa: E731
    none = err(model(query))
    taylor = err(model(query, state=convert(model, demo, mode="taylor")))
    prf = err(model(query, state=convert(model, demo, mode="prf", num_features=4096)))
    assert taylor < none / 10 and prf < none, (none, taylor, prf)


@pytest.mark.parametrize("name", LLAMAS)
def test_greedy_generate_equals_transformers(llama_dirs, name):
    """Token for token: transformers' greedy generate on demonstrations + prompt, ours on the
    same, and ours on the prompt after converting the demonstrations (a KV cache either way).
    In float64 and on inputs whose greedy choices lead by a margin (`naive_greedy`), so that no
    CPU's rounding can flip a token."""
    path, ref = llama_dirs[name]
    model, ref = TransformerLM.from_hf(path).double(), copy.deepcopy(ref).double()
    demo, prompt = tokens(2, 10), tokens(2, 5, seed=2)
    ids = torch.cat([demo, prompt], 1)
    expected = naive_greedy(model, ids, 20)
    theirs = ref.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 15:]
    assert torch.equal(theirs, expected)
    assert torch.equal(generate(model, ids, 20), expected)
    assert torch.equal(generate(model, prompt, 20, state=convert(model, demo)), expected)


def test_finetune_kv_on_grouped_query_projections(llama_dirs):
    """The finetuning baseline's "kv" set is the k/v weights alone (no biases), of the
    grouped-query shape [n_kv_head * head_dim, n_embd]; the batched SGD equals the loop."""
    model = TransformerLM.from_hf(llama_dirs["gqa-tied"][0]).double()
    names = trainable_names(model, "kv")
    assert sorted(names) == sorted(f"blocks.{i}.attn.{p}_proj.weight" for i in range(2) for p in "kv")
    assert all(dict(model.named_parameters())[n].shape == (16, 32) for n in names)
    demos, query = tokens(3, 4, 6, seed=7), tokens(3, 5, seed=8)
    weights = finetune_batched(model, demos, lr=0.5)
    logits = finetuned_logits(model, weights, query)[0]
    for i in range(3):
        tuned = finetune(model, demos[i], lr=0.5)
        for n in names:
            torch.testing.assert_close(weights[n][i], dict(tuned.named_parameters())[n])
        torch.testing.assert_close(logits[i], tuned(query[i : i + 1])[0])
        assert not torch.allclose(logits[i], model(query[i : i + 1])[0])


def recall_data():
    from lit_icl.data import AssociativeRecallDataModule

    return AssociativeRecallDataModule(n_pairs=4, n_keys=8, n_values=8, n_queries=2, num_train=64, num_val=16,
                                       num_heldout=12, batch_size=16)


def test_lightning_module_from_pretrained(llama_dirs, tmp_path, make_trainer):
    """LitTransformerLM(pretrained=DIR): the checkpoint's model; trains and validates with the
    ICL callback (exact KV-prefix conversion, the approximate modes); its checkpoints hold the
    whole config and reload without the directory."""
    from lit_icl.callbacks import ICLConversionCallback

    path = tmp_path / "llama"
    shutil.copytree(llama_dirs["mha-untied"][0], path)
    module = LitTransformerLM(pretrained=str(path), lr=1e-3, warmup_steps=1)
    assert module.training and module.model.blocks[0].training  # a module to train, like any other
    original, ids = TransformerLM.from_hf(path), tokens(2, 9)
    with torch.no_grad():
        assert torch.equal(module(ids), original(ids))
    data = recall_data()
    assert data.vocab_size <= V
    callback = ICLConversionCallback(shots=[2], batch_size=12, num_features=32)
    trainer = make_trainer(max_steps=2, val_check_interval=2, callbacks=[callback], limit_val_batches=1)
    trainer.fit(module, data)
    row = callback.results[2]
    assert row["rel_logit_err"] < 1e-5
    margin = min_candidate_margin(module.model, data.heldout_episodes(2))  # no near-tie to flip
    assert margin > 100 * row["max_abs_logit_diff"], (margin, row["max_abs_logit_diff"])
    assert row["prompted_acc"] == row["converted_kv_acc"]
    assert {"rel_logit_err_taylor", "rel_logit_err_prf"} <= set(row)
    ckpt = tmp_path / "tuned.ckpt"
    trainer.save_checkpoint(ckpt)
    shutil.rmtree(path)
    loaded = LitTransformerLM.load_from_checkpoint(ckpt)
    assert loaded.config == module.config and module.hparams.pretrained == str(path)
    module.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids), module(ids))
        assert not torch.equal(module(ids), original(ids))  # trained: not the directory's weights


def test_pretrained_config_overrides_and_conflicts(llama_dirs):
    path = str(llama_dirs["gqa-tied"][0])
    module = LitTransformerLM({"vocab_size": 20, "dropout": 0.1, "n_layer": 2}, pretrained=path)
    assert module.config.dropout == 0.1 and module.config.vocab_size == V  # the data may use fewer ids
    with torch.no_grad():
        ids = tokens(1, 6)
        assert torch.equal(module.model.eval()(ids), TransformerLM.from_hf(path)(ids))
    cli_like = TransformerConfig(vocab_size=20, n_layer=5)  # what the CLI builds: defaults count as unset
    with pytest.raises(ValueError, match="config.n_layer=5 conflicts with the pretrained checkpoint's n_layer=2"):
        LitTransformerLM(cli_like, pretrained=path)
    with pytest.raises(ValueError, match="vocab_size=500 .* exceeds the pretrained model's vocabulary of 97"):
        LitTransformerLM({"vocab_size": 500}, pretrained=path)
    with pytest.raises(TypeError, match="needs a config"):
        LitTransformerLM()


def test_cli_fit_and_validate_a_pretrained_checkpoint(llama_dirs, run_cli, tmp_path):
    args = ["--model.pretrained", str(llama_dirs["gqa-tied"][0]), "--model.lr", "1e-3",
            "--data", "lit_icl.data.AssociativeRecallDataModule", "--data.init_args.n_pairs", "4",
            "--data.init_args.n_keys", "8", "--data.init_args.n_values", "8", "--data.init_args.num_train", "64",
            "--data.init_args.num_val", "16", "--data.init_args.batch_size", "16",
            "--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]
    proc = run_cli(["fit", *args], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = tmp_path / "checkpoints" / "version_0" / "last.ckpt"
    assert LitTransformerLM.load_from_checkpoint(last).config.n_kv_head == 2
    proc = run_cli(["validate", *args, "--ckpt_path", last], cwd=tmp_path)
    assert proc.returncode == 0 and "val/acc" in proc.stdout, proc.stderr[-3000:]
    from lit_icl.cli import ConfigError, build_cli

    with pytest.raises(ConfigError, match="config.n_head=8 conflicts with the pretrained checkpoint's n_head=4"):
        build_cli([*args[:2], *args[4:20], "--model.config.n_head", "8"], run=False)
