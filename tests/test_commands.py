"""`lit-icl convert` / `lit-icl generate` end to end on real (tiny) checkpoints, and their
one-line errors for bad inputs."""
import json
import pickle
import subprocess

import lightning.pytorch as pl
import pytest
import torch

from lit_icl import ContextState, TransformerConfig, convert
from lit_icl.cli import main
from lit_icl.data import AssociativeRecallDataModule
from lit_icl.generate import generate
from lit_icl.module import LitTransformerLM
from tests.conftest import LIT_ICL


def fit_checkpoint(path, attention):
    dm = AssociativeRecallDataModule(n_pairs=4, n_keys=8, n_values=8, n_queries=2, num_train=32,
                                     num_val=8, batch_size=8)
    torch.manual_seed(0)
    module = LitTransformerLM(TransformerConfig(vocab_size=dm.vocab_size, n_layer=2, n_head=2, n_embd=16,
                                                block_size=24, attention=attention, momentum=0.3, token_shift=True))
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=path.parent)
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {a: fit_checkpoint(root / f"{a}.ckpt", a) for a in ("linear", "softmax")}


def cli(args, capsys):
    """Run lit-icl in-process; (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def write_demos(path, rows):
    path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    return path


DEMOS = [[1, 9, 2, 10, 3, 11], [4, 12, 5, 13]]


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_convert_then_generate_equals_prompting(tmp_path, ckpts, capsys, attention):
    demos = write_demos(tmp_path / "demos.jsonl", DEMOS)
    out = tmp_path / "ctx.safetensors"
    code, stdout, err = cli(["convert", "--ckpt", ckpts[attention], "--demos", demos, "--out", out], capsys)
    assert code == 0, err
    module = LitTransformerLM.load_from_checkpoint(ckpts[attention], map_location="cpu").eval()
    state = ContextState.load(out, module.model)
    assert state.offset.tolist() == [6, 4] and "2 context(s)" in stdout
    code, stdout, err = cli(["generate", "--ckpt", ckpts[attention], "--context", out, "--input_ids", "[3]",
                             "--max_new_tokens", "5"], capsys)
    assert code == 0, err
    got = [list(map(int, line.split())) for line in stdout.strip().splitlines()]
    for row, demo in zip(got, DEMOS):  # greedy, token for token, as prompting demo + query
        assert row == generate(module.model, torch.tensor([demo + [3]]), 5)[0].tolist()


def test_bake_writes_a_loadable_checkpoint(tmp_path, ckpts, capsys):
    demos = write_demos(tmp_path / "one.jsonl", DEMOS[:1])
    baked_path = tmp_path / "baked.ckpt"
    code, _, err = cli(["convert", "--ckpt", ckpts["linear"], "--demos", demos, "--bake", baked_path], capsys)
    assert code == 0, err
    baked = LitTransformerLM.load_from_checkpoint(baked_path, map_location="cpu").eval()
    plain = LitTransformerLM.load_from_checkpoint(ckpts["linear"], map_location="cpu").eval()
    query = torch.tensor([[3, 11]])
    prompted = plain.model(torch.tensor([DEMOS[0] + [3, 11]]))[:, 6:]
    torch.testing.assert_close(baked.model(query), prompted, rtol=1e-5, atol=1e-5)
    assert baked.model.context is not None and plain.model.context is None


def test_softmax_approximate_mode(tmp_path, ckpts, capsys):
    demos = write_demos(tmp_path / "demos.jsonl", DEMOS)
    out = tmp_path / "prf.safetensors"
    code, stdout, err = cli(["convert", "--ckpt", ckpts["softmax"], "--demos", demos, "--out", out,
                             "--mode", "prf", "--num_features", "32"], capsys)
    assert code == 0 and "mode prf" in stdout, err


class Exploit:
    def __reduce__(self):
        return (open, ("/tmp/lit_icl_pwned", "w"))


def bad_cases(tmp_path, ckpts):
    good = write_demos(tmp_path / "good.jsonl", DEMOS)
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "malformed.jsonl").write_text('{"input_ids": [1, 2]}\n{"input_ids": [1,\n')
    write_demos(tmp_path / "big.jsonl", [[1, 99]])
    write_demos(tmp_path / "long.jsonl", [list(range(1, 17)) * 2])
    (tmp_path / "text.jsonl").write_text('{"text": "hello"}\n')
    truncated = tmp_path / "trunc.ckpt"
    truncated.write_bytes(ckpts["linear"].read_bytes()[:2000])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.ckpt")
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": Exploit()}, f)
    other_ctx = tmp_path / "other_ctx.safetensors"
    softmax = LitTransformerLM.load_from_checkpoint(ckpts["softmax"], map_location="cpu")
    convert(softmax.model, torch.tensor([[1, 2, 3]])).save(other_ctx, softmax.model)
    lin, out = ckpts["linear"], tmp_path / "out.safetensors"
    return [
        (["convert", "--ckpt", tmp_path / "missing.ckpt", "--demos", good, "--out", out], "does not exist"),
        (["convert", "--ckpt", truncated, "--demos", good, "--out", out], "not a loadable checkpoint"),
        (["convert", "--ckpt", tmp_path / "other.ckpt", "--demos", good, "--out", out], "not a lit_icl checkpoint"),
        (["convert", "--ckpt", tmp_path / "evil.ckpt", "--demos", good, "--out", out], "not a loadable checkpoint"),
        (["convert", "--ckpt", lin, "--demos", tmp_path / "nope.jsonl", "--out", out], "does not exist"),
        (["convert", "--ckpt", lin, "--demos", tmp_path / "empty.jsonl", "--out", out], "holds no demonstrations"),
        (["convert", "--ckpt", lin, "--demos", tmp_path / "malformed.jsonl", "--out", out], "malformed.jsonl:2: not valid JSON"),
        (["convert", "--ckpt", lin, "--demos", tmp_path / "big.jsonl", "--out", out], "token ids must lie in"),
        (["convert", "--ckpt", lin, "--demos", tmp_path / "long.jsonl", "--out", out], "more than block_size=24"),
        (["convert", "--ckpt", lin, "--demos", tmp_path / "text.jsonl", "--out", out], "needs a checkpoint with a tokenizer"),
        (["convert", "--ckpt", lin, "--demos", good, "--out", out, "--mode", "kv"], "mode='kv' is not available"),
        (["convert", "--ckpt", lin, "--demos", good], "exactly one of --out"),
        (["convert", "--ckpt", lin, "--demos", good, "--out", tmp_path / "no" / "x.safetensors"], "does not exist"),
        (["generate", "--ckpt", lin, "--context", other_ctx, "--input_ids", "[1]"], "made for another model"),
        (["generate", "--ckpt", lin, "--input_ids", "[1]", "--max_new_tokens", "40"], "more than block_size"),
        (["generate", "--ckpt", lin, "--prompt", "hi"], "carries no tokenizer"),
        *[(["fit", "--config", QUICKSTART, *override], message) for override, message in FIT_CASES],
        (["fit", "--config", QUICKSTART, "--ckpt_path", tmp_path / "evil.ckpt"], "nothing in it was run"),
        (["fit", "--config", QUICKSTART, "--ckpt_path", truncated], "not a loadable checkpoint"),
    ]


QUICKSTART = __import__("tests.conftest", fromlist=["ROOT"]).ROOT / "configs" / "quickstart.yaml"
FIT_CASES = [  # bad training configurations: refused before any step runs
    (["--model.config.attention", "flash"], "attention='flash'; allowed"),
    (["--model.config.attention", "[gla, softmax, gla]"], "names 3 layers; n_layer=2 needs one kind per layer"),
    (["--model.config.n_embd", "130"], "n_embd=130 must be divisible by n_head=4"),
    (["--model.config.momentum", "1.0"], "momentum=1.0 must be in [0, 1)"),
    (["--model.config.feature_map", "cosh"], "feature_map='cosh'; allowed"),
    (["--model.lr", "-0.1"], "need lr > 0"),
    (["--model.on_nonfinite", "ignore"], "on_nonfinite='ignore'; allowed"),
    (["--model.config.block_size", "16"], "sequences have 32 tokens, more than model.config.block_size=16"),
    (["--data.init_args.n_pairs", "40"], "n_pairs=40 exceeds n_keys=32"),
    (["--trainer.max_steps", "ten"], "max_steps"),
]


def test_bad_inputs_give_one_line_errors_and_no_output(tmp_path, ckpts, capsys, monkeypatch):
    """Every bad config, demonstration file, state file and checkpoint: one line naming the
    problem, a non-zero exit, no traceback, and no output file."""
    monkeypatch.chdir(tmp_path)  # fit cases would write checkpoints/ and lightning_logs/ here
    cases = bad_cases(tmp_path, ckpts)
    assert len(cases) >= 20
    for args, message in cases:
        code, _, err = cli(args, capsys)
        assert code == 2, (args, err)
        lines = [line for line in err.strip().splitlines() if "error" in line.lower()]
        assert len(lines) == 1 and message in lines[0], (args, err)
        assert "Traceback" not in err
        assert not (tmp_path / "out.safetensors").exists()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()), "no temp file left"
    assert not list(tmp_path.glob("checkpoints/*/*.ckpt")), "no fit case trained"
    assert not __import__("os").path.exists("/tmp/lit_icl_pwned"), "the pickle's code never ran"


def test_installed_command_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run([str(LIT_ICL), "convert", "--ckpt", tmp_path / "x.ckpt", "--demos", "d", "--out", "o"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"lit-icl convert: error: checkpoint {tmp_path / 'x.ckpt'} does not exist"


def tiny_pretrained(path):
    """A Hugging Face directory as `lit-icl data fetch` writes one: a random tiny Gemma 3 (a
    sliding layer with a 3-token window, then a global one) and a word-level tokenizer.json
    whose post-processor puts <bos> first, as Gemma's does."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<pad>", "<bos>", *(f"w{i}" for i in range(30))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(vocab_size=len(words), hidden_size=16, intermediate_size=24,
                                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=8, max_position_embeddings=64, initializer_range=0.3,
                                           sliding_window=3, layer_types=["sliding_attention", "full_attention"])
    transformers.Gemma3ForCausalLM(config).save_pretrained(path)
    tokenizer.save(str(path / "tokenizer.json"))
    return path, tokenizer


def test_a_pretrained_directory_converts_and_generates_with_its_own_tokenizer(tmp_path, capsys):
    """--ckpt takes a Hugging Face directory (a named model the same way): text demonstrations
    and prompts go through its tokenizer, with one BOS at the start of each context only; the
    converted context decodes as prompting BOS + demonstration + prompt does; --bake writes a
    checkpoint that reloads without the directory."""
    from lit_icl import TransformerLM

    path, tokenizer = tiny_pretrained(tmp_path / "gemma")
    texts = ["w3 w4 w5 w6 w7 w8", "w9 w10 w11"]  # longer than the window, and shorter
    (tmp_path / "demos.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "ctx.safetensors"
    code, stdout, err = cli(["convert", "--ckpt", path, "--demos", tmp_path / "demos.jsonl", "--out", out], capsys)
    assert code == 0 and "[7, 4] tokens" in stdout, err
    code, stdout, err = cli(["generate", "--ckpt", path, "--context", out, "--prompt", "w5 w6",
                             "--max_new_tokens", "4"], capsys)
    assert code == 0, err
    model = TransformerLM.from_hf(path)
    for line, text in zip(stdout.strip().splitlines(), texts):
        ids = tokenizer.encode(text + " w5 w6").ids
        assert ids.count(1) == 1 and ids[0] == 1
        assert line == tokenizer.decode(generate(model, torch.tensor([ids]), 4)[0].tolist())
    code, stdout, err = cli(["generate", "--ckpt", path, "--prompt", "w5 w6", "--max_new_tokens", "3"], capsys)
    expected = generate(model, torch.tensor([[1, 7, 8]]), 3)[0].tolist()
    assert code == 0 and stdout.strip() == tokenizer.decode(expected), err
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": texts[0]}) + "\n")
    baked = tmp_path / "baked.ckpt"
    code, _, err = cli(["convert", "--ckpt", path, "--demos", tmp_path / "one.jsonl", "--bake", baked], capsys)
    assert code == 0, err
    reloaded = LitTransformerLM.load_from_checkpoint(baked, map_location="cpu").eval()
    query = torch.tensor([[7, 8]])
    prompted = model(torch.tensor([tokenizer.encode(texts[0]).ids + [7, 8]]))[:, 7:]
    torch.testing.assert_close(reloaded.model(query), prompted, rtol=1e-5, atol=1e-5)
    code, _, err = cli(["generate", "--ckpt", tmp_path, "--input_ids", "[3]"], capsys)
    assert code == 2 and "without config.json" in err
