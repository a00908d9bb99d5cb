"""GPT-2 weights: a small random Hugging Face GPT-2 (transformers, a test-only dependency)
saved to disk, loaded by lit_icl, gives transformers' logits; the conversion script runs."""
import json
import subprocess
import sys

import pytest
import torch

from lit_icl import TransformerLM, convert

transformers = pytest.importorskip("transformers", reason="transformers is a test-only dependency (pip install -e '.[dev]')")
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_logits_match_transformers(gpt2_dir, tmp_path, fmt):
    path = gpt2_dir
    if fmt == "bin":  # the older pytorch_model.bin layout, loaded with weights_only=True
        hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir)
        path = tmp_path / "bin"
        path.mkdir()
        (path / "config.json").write_text((gpt2_dir / "config.json").read_text())
        torch.save(hf.state_dict(), path / "pytorch_model.bin")
    ref = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    ours = TransformerLM.from_hf_gpt2(path)
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(TransformerLM.from_hf(path)(ids), ours(ids))  # from_hf dispatches on model_type


def test_conversion_on_gpt2_weights(gpt2_dir):
    model = TransformerLM.from_hf_gpt2(gpt2_dir)
    demo, query = torch.randint(0, 300, (1, 20)), torch.randint(0, 300, (1, 5))
    prompted = model(torch.cat([demo, query], 1))[:, 20:]
    rel = lambda mode: ((prompted - model(query, state=convert(model, demo, mode=mode))).norm() / prompted.norm()).item()
    assert rel("kv") < 1e-5


def test_bad_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        TransformerLM.from_hf_gpt2(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="only GPT-2"):
        TransformerLM.from_hf_gpt2(tmp_path)


def test_gpt2_conversion_script_runs(gpt2_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["the cat sat on the mat", "a dog ran in the park"] * 20,
                            trainers.BpeTrainer(vocab_size=280, special_tokens=["[UNK]"]))
    tok.save(str(gpt2_dir / "tokenizer.json"))
    out, pairs = tmp_path / "report.json", tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"context": "the cat sat on the mat", "prompt": " the dog"}) + "\n")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpt2_conversion.py"), "--model-dir", str(gpt2_dir),
                           "--pairs", str(pairs), "--max-new-tokens", "4", "--num-features", "64", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["pairs"] and all(row["rel_err"]["kv"] < 1e-5 for row in report["pairs"])
    assert "no context" in proc.stdout and "prf" in proc.stdout
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"context": "the cat sat on the mat " * 20, "prompt": " the dog"}) + "\n")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpt2_conversion.py"), "--model-dir", str(gpt2_dir),
                           "--pairs", str(long)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "block_size" in proc.stderr
