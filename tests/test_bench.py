"""scripts/bench.py --quick: every section runs, the table and the JSON hold every target."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_runs_and_reports(tmp_path):
    out, readme = tmp_path / "bench.json", tmp_path / "README.md"
    readme.write_text("# T\n\n<!-- bench:start -->\nold table\n<!-- bench:end -->\n\nafter\n")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--threads", "1", "--out", str(out),
         "--readme", str(readme)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed < 40, f"quick mode took {elapsed:.0f} s"
    text = readme.read_text()
    assert "old table" not in text and "| 64 | 8 | deltanet |" in text and text.endswith("<!-- bench:end -->\n\nafter\n")

    result = json.loads(out.read_text())
    assert set(result) == {"meta", "kernels", "flops", "training", "conversion", "inference", "recurrent", "evaluation",
                           "head", "mfu", "targets"}
    assert result["meta"]["quick"] is True and result["meta"]["threads"] == 1
    for row in result["kernels"]["by_T"].values():
        assert {"chunked", "chunked (autograd, C=64)", "sdpa (softmax)"} <= set(row)
        assert row["chunked"]["vs_chunked"] == 1.0
    assert 0 < result["flops"]["fraction"]
    for row in result["training"].values():
        assert set(row) == {"linear", "linear+momentum", "softmax", "retention", "simple_gla", "gla", "deltanet"}
        assert all(v["tokens_per_s"] > 0 for v in row.values())
    assert all(v["finetune / convert"] > 0 for v in result["conversion"].values())
    assert set(result["recurrent"]) == {"retention", "simple_gla", "gla", "delta_rule"}
    for kind, v in result["recurrent"].items():
        mid, long = "64", "128"  # QUICK's middle and longest T (JSON keys are strings)
        assert {"chunked", "recurrent"} <= set(v["by_T"][mid]) and set(v["by_T"][long]) == {"chunked"}
        assert ("fla naive chunk" in v["by_T"][mid]) == (kind != "gla")  # fla has no naive chunked GLA
        assert v["scaling"]["ratio"] > 0 and len(v["chunk_sweep"]) == 2
    check_step_cost_sections(result, proc.stdout)
    targets = result["targets"]
    assert len(targets) >= 8 + 7 and all(isinstance(t["met"], bool) for t in targets)

    table = proc.stdout
    assert table.startswith("Machine: ") and "command: `python scripts/bench.py --quick" in table
    assert "QUICK smoke run" in table
    for t in targets:  # each target is a row that says met or NOT met
        assert any(line.startswith(f"| {t['target']} |") and line.rstrip().endswith(("| met |", "| NOT met |"))
                   for line in table.splitlines())


def check_step_cost_sections(result: dict, table: str) -> None:
    """Sections 8 (output head: full logits vs chunked loss) and 9 (share of the matmul rate per
    kind; QUICK skips the compile, tests/test_bench_step_cost.py runs it)."""
    methods = result["head"]["methods"]
    assert list(methods) == ["full logits + F.cross_entropy", "chunked (C=48)", "chunked, recompute (C=48)"]
    for v in methods.values():
        assert v["median_s"] > 0 and v["page_faults"] >= 0 and v["system_s"] >= 0 and len(v["times_s"]) == 2
    kinds = result["mfu"]["kinds"]
    assert set(kinds) == {"linear", "momentum", "softmax", "retention", "simple_gla", "gla", "deltanet"}
    assert result["mfu"]["mm_flops_per_s"] > 0
    for kind, v in kinds.items():
        assert v["flops"] > 0 and v["fraction"] > 0 and "compiled" not in v, kind
        assert abs(v["flops_per_s"] - v["flops"] / v["median_s"]) <= 1e-9 * v["flops_per_s"]
    # momentum adds its own term to linear attention's matmuls
    assert kinds["momentum"]["flops"] > kinds["linear"]["flops"]
    lines = table.splitlines()
    assert any(line.startswith("**8. Output head loss+backward**") for line in lines)
    assert any(line.startswith("**9. Share of the matmul rate") for line in lines)
    assert sum(line.startswith(tuple(f"| {k} |" for k in kinds)) and "skipped (QUICK)" in line for line in lines) == 7


def test_sections_runs_only_the_named_ones(tmp_path):
    out, readme = tmp_path / "bench.json", tmp_path / "README.md"
    readme.write_text("# T\n\n<!-- bench:start -->\nold table\n<!-- bench:end -->\n\nafter\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--threads", "1", "--sections", "recurrent",
         "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result) == {"meta", "recurrent", "targets"}
    assert all(t["target"].startswith(("retention", "simple_gla", "gla", "delta_rule")) for t in result["targets"])
    assert "**6. Recurrent family" in proc.stdout and "**1. Attention" not in proc.stdout


def test_evaluation_cost_section_reports_phases_before_and_after(tmp_path):
    """Section 7 at QUICK size (tiny softmax model, toy label and open-vocabulary episodes): every
    phase of measure() per episode, before and after, and the speedup; no assertion on speed."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--threads", "1", "--sections", "evaluation",
         "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result) == {"meta", "evaluation", "targets"} and result["targets"] == []
    phases = {"zero_shot", "prompted", "check", "convert", "finetune", "finetuned", "metrics", "total"}
    tasks = result["evaluation"]["tasks"]
    assert set(tasks) == {"label", "open"}
    for name, t in tasks.items():
        assert set(t["per_episode_s"]) == {"before", "after"}
        for contender, row in t["per_episode_s"].items():
            assert set(row) == phases, (name, contender, row)
            assert all(v >= 0 for v in row.values()) and row["total"] > 0
            assert len(t["rounds_s"][contender]) == 2  # QUICK's rounds
        assert t["speedup"] > 0
    lines = proc.stdout.splitlines()
    assert any(line.startswith("**7. ICL-vs-finetuning evaluation cost**") for line in lines)
    header = next(line for line in lines if line.startswith("| task | |"))
    assert all(f" {p} |" in header for p in phases | {"speedup"})
    for name in tasks:
        assert sum(line.startswith((f"| {name} | before |", f"| {name} | after |")) for line in lines) == 2
