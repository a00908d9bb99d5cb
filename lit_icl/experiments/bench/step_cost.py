"""Sections 8 and 9 of the benchmark (scripts/bench.py): where a training step's time goes.

8. The output head's loss and backward at the text configs' shapes (configs/text_momentum.yaml:
   width 512, vocabulary 16,384; FULL 8 x 512 tokens instead of 32 x 512 to fit a small machine):
   the full float32 logits + F.cross_entropy against `lit_icl.loss.chunked_cross_entropy` (its
   default chunk, the gradient made in the forward pass, and with recompute=True). Per step:
   the median time over alternating rounds, the peak growth of resident memory
   (`timing.peak_memory`), and the minor page faults and system CPU seconds of the process
   (getrusage): glibc maps every tensor above 32 MiB afresh and unmaps it when freed, so the
   full logits' page faults show up there (jemalloc with retained pages avoids most of them:
   scripts/train.sh preloads it when installed, `apt install libjemalloc2`).
9. The share of the machine's matmul rate that a forward+backward of a small LM reaches per
   attention kind (2 layers, width 128, 2 heads, vocabulary 256, T=4096, batch 2 in FULL):
   FLOPs of one step counted by torch.utils.flop_counter.FlopCounterMode (matmuls, attention
   and convolutions; elementwise work counts nothing), divided by the step time and by torch.mm's
   rate at 1024^2 (`timing.matmul_check`'s size, this thread count), the matmul alternating with
   the steps: a share is the median over rounds of the step's FLOP/s over the matmul's in the
   same round, so that a machine whose load changes over minutes still gives a ratio of
   neighbours. The kinds alternate in one process (eager). Then torch.compile (inductor) per
   kind, each in a fresh process (spawn) with a fresh inductor cache folder, so that the cold
   compile is cold and a compile that hangs or crashes costs only its kind: the first call
   (cold: tracing and compiling), then the matmul, eager and compiled alternating; a failure or
   a timeout is recorded with its reason, and the graph breaks dynamo reports are counted. The
   model is called with check=False (its input check reads the ids' range, a graph break that is
   no part of the step). QUICK skips the compile (minutes on a small CPU).
"""
from __future__ import annotations

import multiprocessing
import os
import resource
import shutil
import statistics
import tempfile
import time
from typing import Callable

import torch
import torch.nn.functional as F

from lit_icl.experiments.bench.timing import alternate, fmt_s, med, peak_memory, ratio
from lit_icl.loss import chunk_rows, chunked_cross_entropy

HEAD_FULL = dict(N=8 * 512, D=512, V=16384, chunk=None, reps=5)  # chunk None: chunked_cross_entropy's default
HEAD_QUICK = dict(N=256, D=32, V=512, chunk=48, reps=2)
MFU_FULL = dict(n_layer=2, n_embd=128, n_head=2, vocab=256, T=4096, B=2, reps=3, compile=True,
                backend="inductor", compile_timeout_s=1200)
MFU_QUICK = dict(n_layer=2, n_embd=32, n_head=2, vocab=64, T=64, B=2, reps=2, compile=False,
                 backend="inductor", compile_timeout_s=60)
MM_N, MM_CALLS = 1024, 4  # the matmul contender: timing.matmul_check's size, a few calls a round
MM_FLOPS = MM_CALLS * 2 * MM_N**3
KINDS = {"linear": {}, "momentum": {"momentum": 0.5}, "softmax": {"attention": "softmax"},
         **{kind: {"attention": kind} for kind in ("retention", "simple_gla", "gla", "deltanet")}}


def counted(fn: Callable[[], object], log: list[tuple[int, float]]) -> Callable[[], None]:
    """fn, recording the minor page faults and system CPU seconds of each call in `log`."""
    def run():
        before = resource.getrusage(resource.RUSAGE_SELF)
        fn()
        after = resource.getrusage(resource.RUSAGE_SELF)
        log.append((after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime))
    return run


def head_contenders(hc: dict) -> dict[str, Callable[[], None]]:
    """Loss and gradients (hidden and weight) of the head by each method, on one random input."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(hc["N"], hc["D"], generator=g).requires_grad_()
    weight = (torch.randn(hc["V"], hc["D"], generator=g) / hc["D"] ** 0.5).requires_grad_()
    labels = torch.randint(0, hc["V"], (hc["N"],), generator=g)
    C = hc["chunk"] or chunk_rows(hc["V"])

    def full():
        torch.autograd.grad(F.cross_entropy(hidden @ weight.T, labels), (hidden, weight))

    def chunked(recompute: bool):
        return lambda: torch.autograd.grad(chunked_cross_entropy(hidden, weight, labels, C, recompute=recompute),
                                           (hidden, weight))

    return {"full logits + F.cross_entropy": full, f"chunked (C={C})": chunked(False),
            f"chunked, recompute (C={C})": chunked(True)}


def bench_head(cfg: dict) -> dict:
    hc = cfg["head"]
    fns, logs = head_contenders(hc), {}
    timed = {name: counted(fn, logs.setdefault(name, [])) for name, fn in fns.items()}
    times = alternate(timed, hc["reps"])
    first = list(times)[0]
    out = {}
    for name, ts in times.items():
        faults, system = zip(*logs[name][1:])  # the first call was the warm-up
        out[name] = {"median_s": med(ts), "vs_full": ratio(times, name, first), "times_s": ts,
                     "page_faults": statistics.median(faults), "system_s": statistics.median(system),
                     "peak_bytes": peak_memory(fns[name])}
    return {"shape": {k: hc[k] for k in ("N", "D", "V")}, "methods": out}


def head_table(cfg: dict, r: dict) -> list[str]:
    s = r["shape"]
    lines = [f"**8. Output head loss+backward** (N={s['N']} tokens, width {s['D']}, vocabulary {s['V']}, float32; "
             f"median of {cfg['head']['reps']} alternating rounds; page faults and system time of the process per "
             "step; peak RSS growth of one call after the others, glibc's freed memory trimmed first (0 under an "
             "allocator that keeps freed pages, as jemalloc preloaded by scripts/train.sh); x = time / full)", "",
             "| method | time | vs full | peak RSS growth | minor page faults | system time |",
             "|---|---|---|---|---|---|"]
    for name, v in r["methods"].items():
        mem = "n/a" if v["peak_bytes"] is None else f"{v['peak_bytes'] / 2**20:.0f} MiB"
        lines.append(f"| {name} | {fmt_s(v['median_s'])} | {v['vs_full']:.2f}x | {mem} | {v['page_faults']:,.0f} "
                     f"| {fmt_s(v['system_s'])} |")
    return lines


def small_lm(mc: dict, kind: str):
    from lit_icl.model import TransformerConfig, TransformerLM

    torch.manual_seed(0)
    return TransformerLM(TransformerConfig(vocab_size=mc["vocab"], block_size=mc["T"], n_layer=mc["n_layer"],
                                           n_head=mc["n_head"], n_embd=mc["n_embd"], **KINDS[kind]))


def train_step(model, mc: dict) -> Callable[[], None]:
    """Forward, cross-entropy and backward of `model` (eager or compiled) on one fixed batch."""
    ids = torch.randint(0, mc["vocab"], (mc["B"], mc["T"] + 1), generator=torch.Generator().manual_seed(0))

    def step():
        for p in model.parameters():
            p.grad = None
        logits = model(ids[:, :-1], check=False)
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()

    return step


def step_flops(step: Callable[[], None]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def matmul_contender() -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(MM_N, MM_N, generator=g), torch.randn(MM_N, MM_N, generator=g)

    def run():
        for _ in range(MM_CALLS):
            torch.mm(a, b)

    return run


def shares(times: dict[str, list[float]], flops: dict[str, int]) -> dict[str, float]:
    """Per step: the median over rounds of its FLOP/s over the matmul's ("mm") in the same round."""
    return {name: statistics.median(f * tm / (MM_FLOPS * t) for t, tm in zip(times[name], times["mm"]))
            for name, f in flops.items()}


def graph_breaks() -> int | None:
    """Graph breaks dynamo has counted in this process (an internal counter; None if it moved)."""
    try:
        from torch._dynamo.utils import counters

        return sum(counters["graph_break"].values())
    except (ImportError, AttributeError, KeyError):
        return None


def compile_child(conn, mc: dict, kind: str, threads: int, flops: int, cache: str) -> None:
    """In a fresh process: cold compile of one kind's step (of `flops`), with inductor's cache in
    the empty folder `cache`, then the matmul, eager and compiled alternating."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # nothing compiled before counts as warm
    try:
        torch.set_num_threads(threads)
        model = small_lm(mc, kind)
        eager = train_step(model, mc)
        start = time.perf_counter()
        try:
            fast = train_step(torch.compile(model, backend=mc["backend"]), mc)
            fast()
        except Exception as e:  # noqa: BLE001 (any failure of the compiler is the result)
            first = (str(e).strip().splitlines() or [""])[0]
            conn.send({"error": f"{type(e).__name__}: {first[:200]}"})
            return
        cold = time.perf_counter() - start
        times = alternate({"mm": matmul_contender(), "eager": eager, "compiled": fast}, mc["reps"])
        share = shares(times, {"eager": flops, "compiled": flops})
        conn.send({"cold_s": cold, "median_s": med(times["compiled"]), "flops_per_s": flops / med(times["compiled"]),
                   "fraction": share["compiled"], "eager_s": med(times["eager"]), "eager_fraction": share["eager"],
                   "mm_flops_per_s": MM_FLOPS / med(times["mm"]), "vs_eager": ratio(times, "compiled", "eager"),
                   "graph_breaks": graph_breaks()})
    finally:
        conn.close()


def compile_cost(mc: dict, kind: str, threads: int, flops: int) -> dict:
    """compile_child's result for one kind, or {"error": why} (its exception, a timeout, a crash)."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    cache = tempfile.mkdtemp(prefix="lit_icl_inductor_")  # removed here: a stopped child cleans nothing
    proc = ctx.Process(target=compile_child, args=(send, mc, kind, threads, flops, cache), daemon=True)
    start = time.perf_counter()
    proc.start()
    send.close()
    try:
        if receive.poll(mc["compile_timeout_s"]):
            return receive.recv()
        if proc.is_alive():
            return {"error": f"no result within {mc['compile_timeout_s']} s (stopped)"}
        return {"error": f"the compile process ended with exit code {proc.exitcode} after "
                         f"{time.perf_counter() - start:.0f} s"}
    except EOFError:
        proc.join(5)
        return {"error": f"the compile process ended with exit code {proc.exitcode} and no result"}
    finally:
        proc.join(30)  # a child that sent its result ends by itself
        if proc.is_alive():
            proc.kill()
            proc.join()
        shutil.rmtree(cache, ignore_errors=True)


def bench_mfu(cfg: dict) -> dict:
    mc, threads = cfg["mfu"], torch.get_num_threads()
    steps = {kind: train_step(small_lm(mc, kind), mc) for kind in KINDS}
    flops = {kind: step_flops(step) for kind, step in steps.items()}
    times = alternate({"mm": matmul_contender(), **steps}, mc["reps"])
    share = shares(times, flops)
    out = {"mm_flops_per_s": MM_FLOPS / med(times.pop("mm")), "threads": threads, "kinds": {}}
    for kind, ts in times.items():
        row = {"flops": flops[kind], "median_s": med(ts), "flops_per_s": flops[kind] / med(ts), "fraction": share[kind],
               "times_s": ts}
        if mc["compile"]:
            row["compiled"] = compile_cost(mc, kind, threads, flops[kind])
        out["kinds"][kind] = row
    return out


def mfu_table(cfg: dict, r: dict) -> list[str]:
    mc = cfg["mfu"]
    lines = [f"**9. Share of the matmul rate, forward+backward per attention kind** ({mc['n_layer']} layers, width "
             f"{mc['n_embd']}, {mc['n_head']} heads, vocabulary {mc['vocab']}, T={mc['T']}, batch {mc['B']}, "
             f"{r['threads']} threads; FLOPs by FlopCounterMode on one step; share: of torch.mm 1024^2's rate in the "
             f"same round, median {r['mm_flops_per_s'] / 1e9:.0f} GFLOP/s; compiled: torch.compile({mc['backend']}), "
             "each kind in a fresh process, cold = first call, compiled / eager: step times alternating in that "
             "process)", "",
             "| kind | GFLOP/step | eager step | eager GFLOP/s | eager share | compile cold | compiled step "
             "| compiled GFLOP/s | compiled share | compiled / eager | graph breaks |", "|---" * 11 + "|"]
    for kind, v in r["kinds"].items():
        cells = [f"{v['flops'] / 1e9:.2f}", fmt_s(v["median_s"]), f"{v['flops_per_s'] / 1e9:.1f}",
                 f"{100 * v['fraction']:.0f}%"]
        c = v.get("compiled")
        if c is None:
            cells += ["skipped (QUICK)" if not mc["compile"] else "-"] + ["-"] * 5
        elif "error" in c:
            cells += [f"failed: {c['error']}".replace("|", "/")] + ["-"] * 5
        else:
            breaks = "n/a" if c["graph_breaks"] is None else str(c["graph_breaks"])
            cells += [f"{c['cold_s']:.0f} s", fmt_s(c["median_s"]), f"{c['flops_per_s'] / 1e9:.1f}",
                      f"{100 * c['fraction']:.0f}%", f"{c['vs_eager']:.2f}x", breaks]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines
