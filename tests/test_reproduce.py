"""scripts/reproduce.py and what it needs in the framework: SimAM over a padded query's real
tokens only, the ICL callback's untrained-model baseline (Deutch et al., 2024), and the three
experiments' --quick versions end to end (tiny models, self-written data, no download),
including that a rerun skips finished runs and that the README section is generated; and that
the scripts are entry points over lit_icl.experiments, which the core package never imports."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lit_icl.callbacks import ICLConversionCallback
from lit_icl.data import AssociativeRecallDataModule
from lit_icl.data.episodes import Episodes
from lit_icl.metrics import SimAM
from lit_icl.model import TransformerConfig, TransformerLM
from lit_icl.module import LitTransformerLM

ROOT = Path(__file__).resolve().parents[1]
SIMILARITY = ("rec2ftp", "simaou", "simaou_random", "simam_icl_ft", "simam_icl_zsl")


def softmax_model(seed: int) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(TransformerConfig(vocab_size=20, n_layer=2, n_head=2, n_embd=16, block_size=32,
                                           attention="softmax", position="rope")).eval()


def test_simam_compares_a_left_padded_query_over_its_real_tokens():
    queries = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    ep = Episodes.from_lists([[[1, 2]]] * 3, queries, [5, 5, 5], [5, 6], pad_id=0)
    a, b = softmax_model(0), softmax_model(1)
    padded = [m.run(ep.query_ids, attention_mask=ep.query_mask, need_attn=True).attn_scores for m in (a, b)]
    masked, unmasked, alone = SimAM(2), SimAM(2), SimAM(2)
    masked.update(*padded, ep.query_mask)
    unmasked.update(*padded)
    for q in queries:  # each query by itself: no padding at all
        ids = torch.tensor([q])
        alone.update(*[m.run(ids, need_attn=True).attn_scores for m in (a, b)])
    assert torch.allclose(masked.compute(), alone.compute(), atol=1e-6)
    assert not torch.allclose(unmasked.compute(), alone.compute(), atol=1e-3), "padding scores used to enter the cosine"


def tiny_fit(tmp_path, cb, seed=0):
    dm = AssociativeRecallDataModule(n_pairs=4, n_keys=8, n_values=8, n_queries=2, num_train=64, num_val=16,
                                     num_heldout=12, batch_size=16)
    torch.manual_seed(seed)
    module = LitTransformerLM(TransformerConfig(vocab_size=dm.vocab_size, n_layer=2, n_head=2, n_embd=16,
                                                block_size=32, attention="softmax"))
    initial = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = pl.Trainer(max_steps=4, val_check_interval=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[cb])
    trainer.fit(module, datamodule=dm)
    return trainer, module, initial


def test_untrained_baseline_is_the_initial_weights_and_logged_next_to_the_trained_figures(tmp_path):
    cb = ICLConversionCallback(shots=[0, 2], batch_size=6, untrained_baseline=True)
    trainer, module, initial = tiny_fit(tmp_path, cb)
    kept = dict(cb.untrained.named_parameters())
    assert all(torch.equal(kept[n], p) for n, p in initial.items()), "the weights at the start of fit"
    assert any(not torch.equal(kept[n], p) for n, p in module.model.named_parameters()), "the model trained"
    for name in SIMILARITY + ("prompted_acc",):
        assert f"icl/{name}_untrained/k=2" in trainer.callback_metrics, name
    row = cb.results[2]
    assert row["simaou_untrained"] != row["simaou"] and -1 <= row["simam_icl_ft_untrained"] <= 1
    plain = ICLConversionCallback(shots=[0, 2], batch_size=6)
    trainer2, _, _ = tiny_fit(tmp_path, plain)
    assert not any(k.endswith("_untrained/k=2") for k in trainer2.callback_metrics)
    assert plain.results[2] == {k: v for k, v in row.items() if not k.endswith("_untrained")}, \
        "the trained figures do not change with the baseline on"


def test_untrained_baseline_of_a_given_model_is_a_seeded_fresh_init():
    model = softmax_model(5)
    rng = torch.get_rng_state()
    first = ICLConversionCallback(seed=3, untrained_baseline=True).untrained_model(model)
    second = ICLConversionCallback(seed=3, untrained_baseline=True).untrained_model(model)
    other = ICLConversionCallback(seed=4, untrained_baseline=True).untrained_model(model)
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG is left alone"
    assert first.config == model.config
    w = [m.blocks[0].attn.k_proj.weight for m in (first, second, other, model)]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2]) and not torch.equal(w[0], w[3])


def reproduce(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce.py"), *args], capture_output=True,
                            text=True, timeout=timeout, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def quick_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("reproduce")


def test_quick_momentum(quick_dir):
    reproduce("momentum", "--quick", "--out", str(quick_dir))
    data = json.loads((quick_dir / "momentum.json").read_text())
    assert len(data["runs"]) == 8 and (quick_dir / "momentum.png").stat().st_size > 0
    for run in data["runs"].values():
        assert {"attention", "eta", "seed", "seconds"} <= set(run) and run["result"]["val_ppl"] > 1
        assert run["result"]["curves"]["val/ppl"][-1][0] == data["config"]["steps"] - 1
    summary = data["summary"]
    assert summary["linear-eta0.5"]["ppl"] != summary["linear-eta0"]["ppl"], "momentum changes the model"
    assert "| softmax | eta = 0.5 |" in (quick_dir / "momentum.md").read_text()
    again = reproduce("momentum", "--quick", "--out", str(quick_dir))
    assert again.stderr.count("done earlier") == 8 and "Seed set" not in again.stderr
    fewer = reproduce("momentum", "--quick", "--out", str(quick_dir), "--seeds", "2")  # seeds only pick runs
    assert fewer.stderr.count("done earlier") == 4 and "Seed set" not in fewer.stderr
    assert json.loads((quick_dir / "momentum.json").read_text())["summary"]["linear-eta0"]["ppl"] == \
        summary["linear-eta0"]["ppl"][1:]
    other = reproduce("momentum", "--quick", "--out", str(quick_dir), "--steps", "2")  # another size: afresh
    assert "runs are not reused" in other.stderr and other.stderr.count("Seed set") == 8


def test_quick_icl_vs_ft(quick_dir, tmp_path):
    reproduce("icl-vs-ft", "--quick", "--out", str(quick_dir))
    data = json.loads((quick_dir / "icl-vs-ft.json").read_text())
    cfg, runs, summary = data["config"], data["runs"], data["summary"]
    assert cfg["tasks"] == ["uppercase", "first_letter", "mr", "bbc"] and set(runs) == set(cfg["tasks"])
    for task in cfg["tasks"]:
        result = runs[task]["result"]
        assert set(result["shots"]) == {str(k) for k in cfg["shots"]}, "every shot count in one run per task"
        assert result["open_vocabulary"] == (task not in ("mr", "bbc"))
        assert {"zero_shot", "prompted", "finetune", "select_lr", "untrained"} <= set(result["seconds"])
        zero = result["shots"]["0"]["zero_shot_acc"]
        for k in cfg["shots"]:
            row = result["shots"][str(k)]
            assert row["zero_shot_acc"] == zero, "zero-shot is computed once and shared"
            assert 0 <= row["ft_changed"] <= 1 and 0 <= row["finetuned_acc"] <= 1
            for name in SIMILARITY:
                assert name in row and f"{name}_untrained" in row
            if k:
                assert row["finetune_lr"] in cfg["lr_grid"]
                assert {f"finetune_select_loss/lr={lr:g}" for lr in cfg["lr_grid"]} <= set(row)
                assert row["rel_logit_err"] < 1e-10 and row["max_abs_logit_diff"] < 1e-10, "the KV prefix is exact"
                assert row["converted_kv_acc"] == row["prompted_acc"]
                # ICLAA's random features lose information by a margin (measured 4e-3 with 16 features);
                # the Taylor map is exact to about 1e-7 at the tiny scores of a random model: logged only
                assert row["rel_logit_err_prf"] > 1e-4 and "rel_logit_err_taylor" in row
                assert row["simaou_untrained"] != row["simaou"]
        assert summary["lr"][task] == {str(k): result["shots"][str(k)]["finetune_lr"] for k in cfg["shots"] if k}
    assert runs["uppercase"]["result"]["answer_tokens"] > 1, "a multi-token answer, scored by exact match"
    assert summary["conversion_error"]["rel_logit_err"] < 1e-10
    assert set(summary["seconds"]["per_task"]) == set(cfg["tasks"]) and summary["seconds"]["per_phase"]["select_lr"] > 0
    text = (quick_dir / "icl-vs-ft.md").read_text()
    assert "| task | zero-shot | ICL 1 | ICL 2 | converted 2 | finetuned 2 | FT changed 2 | lr 1/2 |" in text
    assert "| uppercase | " in text and "| Dai et al. (2023), GPT 1.3B / 2.7B, 32 shots | 85.6 / 89.4 |" in text
    assert "**Reading.**" in text and "Cost: " in text and "--quick" in text
    assert "has the prompted accuracy on every row" in text
    changed = max(r["ft_changed"] for run in runs.values() for r in run["result"]["shots"].values())
    assert ("changed no prediction" in text) == (changed == 0)
    result_part = text[text.index("## Result"):text.index("## What differs")]
    assert "—" not in result_part, "finetuning that changes nothing is said in words"
    assert (quick_dir / "icl-vs-ft.png").stat().st_size > 0
    readme = tmp_path / "README.md"  # a copy of the README: its section, the rest kept
    original = (ROOT / "README.md").read_text()
    readme.write_text(original)
    reproduce("readme", "--out", str(quick_dir), "--readme", str(readme))
    written = readme.read_text()
    section = written[written.index("### In-context learning vs finetuning"):]
    section = section[:section.index("\n### ")] if "\n### " in section else section
    assert "| uppercase | " in section and "**Reading.**" in section and "SimAM(ICL,FT) | untrained" in section
    assert "--quick" in section and "—" not in section, "finetuning that changes nothing is said in words"
    before = original.split("<!-- reproduce:begin")[0] if "<!-- reproduce:begin" in original else original
    assert written.startswith(before)
    again = reproduce("icl-vs-ft", "--quick", "--out", str(quick_dir), "--tasks", "mr", "uppercase")
    assert again.stderr.count("done earlier") == 2, "finished tasks are kept"
    assert list(json.loads((quick_dir / "icl-vs-ft.json").read_text())["summary"]["tasks"]) == ["mr", "uppercase"]


def test_quick_icl_emergence(quick_dir):
    from lit_icl.experiments.icl_emergence import KINDS

    reproduce("icl-emergence", "--quick", "--out", str(quick_dir))
    data = json.loads((quick_dir / "icl-emergence.json").read_text())
    assert len(data["runs"]) == 2 * len(KINDS) and set(data["summary"]) == set(KINDS)
    assert data["figures"] == ["icl-emergence.png", "icl-emergence-position.png"]
    for name in data["figures"]:
        assert (quick_dir / name).stat().st_size > 0
    for run in data["runs"].values():
        r = run["result"]
        assert [step for step, _ in r["curves"]["icl/text/score"]] == [1, 3]  # every validation
        assert r["held_out"].startswith("whole files: part") and r["positions"] == [3, 32]
        assert len(r["loss_at_end"]) == 32 and r["final"]["converted_max_abs_diff"] < 1e-9  # float64: exact
        # TensorBoard stores float32
        assert r["final"]["score"] == pytest.approx(r["final"]["loss_late"] - r["final"]["loss_early"], abs=1e-5)
    text = (quick_dir / "icl-emergence.md").read_text()
    assert "| gla+softmax |" in text and "phase change" in text and "--quick" in text


def test_quick_iclaa_and_the_readme_section(quick_dir, tmp_path):
    reproduce("iclaa", "--quick", "--out", str(quick_dir))
    data = json.loads((quick_dir / "iclaa.json").read_text())
    s = data["summary"]
    assert len(data["runs"]) == data["config"]["pairs"]
    assert s["kv"]["rel_err"]["mean"] < 1e-10 and s["kv"]["agree"]["mean"] == 1.0  # float64: no near-tie flips
    assert s["none"]["rel_err"]["mean"] > s["kv"]["rel_err"]["mean"]
    assert {"taylor", "prf8", "prf32"} <= set(s)
    continuation = data["runs"]["pair0"]["result"]["continuation"]
    assert continuation["prompted"] and continuation["kv"] == continuation["prompted"], "greedy decoding is exact"
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nintro\n")
    reproduce("readme", "--out", str(quick_dir), "--readme", str(readme))
    first = readme.read_text()
    assert first.startswith("# Title\n\nintro\n") and first.count("reproduce:begin") == 1
    assert "| kv |" in first  # the other experiments' tables when their quick tests ran first (file order)
    assert ("| softmax | eta = 0.5 |" in first) == (quick_dir / "momentum.json").exists()
    assert ("SimAM(ICL,FT)" in first) == (quick_dir / "icl-vs-ft.json").exists()
    assert ("| gla+softmax |" in first) == (quick_dir / "icl-emergence.json").exists()
    readme.write_text(first + "\n## After\n")
    reproduce("readme", "--out", str(quick_dir), "--readme", str(readme))
    assert readme.read_text() == first + "\n## After\n", "the marked block is replaced, the rest kept"


def test_bad_arguments(tmp_path):
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce.py"), "icl-vs-ft", "--quick", "--out",
                          str(tmp_path), "--tasks", "sst2"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "--tasks ['sst2']: unknown with --quick (toy data); allowed: ['uppercase'," in bad.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce.py"), "icl-vs-ft", "--out", str(tmp_path),
                          "--tasks", "uppercase", "country_capitals"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "--tasks ['country_capitals']: unknown; allowed: ['uppercase'," in bad.stderr
    assert "'country_capital'" in bad.stderr and "'mr', 'bbc']" in bad.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce.py"), "momentum", "--out", str(tmp_path),
                          "--steps", "0"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "--steps=0 must be >= 1" in bad.stderr


def imported_modules(path: Path) -> set[str]:
    """Every module a Python file imports ("." + name for a relative import), also inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def test_scripts_import_the_package_never_each_other_and_the_core_never_imports_experiments():
    scripts = sorted((ROOT / "scripts").glob("*.py"))
    siblings = {p.stem for p in scripts}
    assert {"reproduce", "kinds", "bench"} <= siblings
    for path in scripts:
        imported = imported_modules(path)
        assert not {m for m in imported if m.startswith(".") or m.split(".")[0] in siblings}, \
            f"{path.name} imports another script: {sorted(imported)}"
        assert "sys.path" not in path.read_text(), f"{path.name} edits sys.path"
    assert "lit_icl.experiments.reproduce" in imported_modules(ROOT / "scripts" / "reproduce.py")
    core = [p for p in (ROOT / "lit_icl").rglob("*.py") if "experiments" not in p.relative_to(ROOT / "lit_icl").parts]
    assert len(core) > 10
    for path in core:
        offending = {m for m in imported_modules(path) if m.startswith("lit_icl.experiments")}
        assert not offending, f"{path.relative_to(ROOT)} imports {offending}: experiments sit on top of the package"


def test_phase_change_rule_reads_drops_rises_and_recoveries():
    """The report's reading of one score curve: the largest drop and rise between validations,
    and whether the drop lasts; a curve that only rises has no lasting drop to call."""
    from lit_icl.experiments.icl_emergence import moves

    rising = [[29, 0.0], [59, 0.04], [89, 0.03], [119, 0.05]]
    m = moves(rising)
    assert m["drop"] == [60, 90, pytest.approx(0.01)] and not m["lasting"], "the dip is climbed back"
    assert m["rise"] == [30, 60, pytest.approx(0.04)] and m["net"] == pytest.approx(0.05)
    falling = [[29, 0.3], [59, 0.29], [89, 0.1], [119, 0.12]]
    m = moves(falling)
    assert m["drop"] == [60, 90, pytest.approx(0.19)] and m["lasting"] and m["net"] < 0
    assert moves([[0, 1.0]]) == dict(drop=None, rise=None, lasting=False, net=0.0)
