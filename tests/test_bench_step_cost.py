"""Section 9 of scripts/bench.py with torch.compile (QUICK skips it; tests/test_bench.py checks
the rest of sections 8 and 9): a kind compiled in a fresh process, and a compile that fails or
hangs becomes a row, not a crash. No assertion on speed."""
import tempfile
from pathlib import Path

from lit_icl.experiments.bench import QUICK
from lit_icl.experiments.bench.step_cost import compile_cost, mfu_table

TINY = dict(QUICK["mfu"], T=32, compile=True)


def inductor_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("lit_icl_inductor_*"))


def test_compile_cost_measures_a_kind_in_a_fresh_process():
    """backend="eager": dynamo traces the step (no code generation), so this stays seconds."""
    before = inductor_folders()
    r = compile_cost(dict(TINY, backend="eager"), "linear", threads=1, flops=10**8)
    assert "error" not in r, r
    assert r["cold_s"] > 0 and r["median_s"] > 0 and r["vs_eager"] > 0 and r["fraction"] > 0 and r["eager_fraction"] > 0
    assert r["flops_per_s"] == 10**8 / r["median_s"]
    assert inductor_folders() <= before  # the cache folder is gone with its process
    assert r["graph_breaks"] is None or r["graph_breaks"] >= 0


def test_compile_failure_and_timeout_become_rows():
    before = inductor_folders()
    failed = compile_cost(dict(TINY, backend="no_such_backend"), "linear", threads=1, flops=1)
    assert failed["error"].startswith("InvalidBackend"), failed
    slow = compile_cost(dict(TINY, backend="eager", compile_timeout_s=0.5), "linear", threads=1, flops=1)
    assert slow == {"error": "no result within 0.5 s (stopped)"}
    assert inductor_folders() <= before  # a stopped process's cache folder is removed too
    r = {"threads": 1, "mm_flops_per_s": 1e11, "kinds": {
        "linear": {"flops": 2e9, "median_s": 0.1, "flops_per_s": 2e10, "fraction": 0.2, "compiled": failed},
        "gla": {"flops": 2e9, "median_s": 0.1, "flops_per_s": 2e10, "fraction": 0.2,
                "compiled": {"cold_s": 30.0, "median_s": 0.05, "vs_eager": 0.5, "graph_breaks": 3,
                             "flops_per_s": 4e10, "fraction": 0.4}}}}
    lines = mfu_table({"mfu": TINY}, r)
    linear = next(line for line in lines if line.startswith("| linear |"))
    gla = next(line for line in lines if line.startswith("| gla |"))
    assert "failed: InvalidBackend" in linear and linear.count("|") == 12
    assert gla == "| gla | 2.00 | 100.0 ms | 20.0 | 20% | 30 s | 50.0 ms | 40.0 | 40% | 0.50x | 3 |"
