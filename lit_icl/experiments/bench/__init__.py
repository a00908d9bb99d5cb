"""Benchmark of lit_icl's performance claims, behind `scripts/bench.py`: a markdown table and
the results as JSON.

Every comparison is a ratio measured in this one process: the contenders run alternately
(round r runs them in order, round r+1 in reverse), after a warm-up round, and each figure is a
median over rounds (a ratio is the median of the per-round ratios), since the machine is shared.
Sections (float32 on the CPU):
 1. attention forward+backward: fast chunked linear attention (hand-written backward) vs its
    plain-autograd form, the quadratic form, causal softmax SDPA, and flash-linear-attention's
    pure-PyTorch chunked reference when fla is installed; B=4, H=8, head dim 64.
 2. achieved GFLOP/s of the chunked kernel vs this machine's large-matmul rate (same run).
 3. a training step of the quickstart-size LM per attention kind (linear, linear+momentum,
    softmax, retention, simple GLA, GLA, DeltaNet): tokens/s and the peak growth of resident
    memory during a step.
 4. conversion (`convert`, one no-grad pass) vs the finetuning baseline (`finetune`: SGD, batch
    size 1) and its batched form (`finetune_batched`), per episode.
 5. inference per query on the converted context (`model(query, state=...)`) vs with the prompt.
 6. the recurrent family's ops (retention, simple GLA, GLA, DeltaNet): chunked vs recurrent vs
    fla's pure-PyTorch chunked reference, and linear in T (bench/recurrent.py).
 7. the ICL-vs-finetuning comparison (`lit_icl.evaluation.measure`) on SmolLM2-135M, seconds per
    episode of each phase, before and after it was made cheaper (bench/evaluation_cost.py).
 8. the output head's loss+backward at the text configs' width and vocabulary: full logits +
    F.cross_entropy vs lit_icl.loss.chunked_cross_entropy; time, peak resident memory, page
    faults and system time per step (bench/step_cost.py).
 9. the share of the matmul rate a forward+backward reaches per attention kind (FLOPs by
    torch.utils.flop_counter), eager and with torch.compile (cold compile and steady step, or
    the failure), each kind compiled in a fresh process (bench/step_cost.py).
QUICK shrinks every shape for a smoke run (a test runs it); its targets are not meaningful.
Timing helpers: bench/timing.py.
"""
from __future__ import annotations

import datetime
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from lit_icl import TransformerConfig, TransformerLM, convert
from lit_icl.finetune import finetune, finetune_batched
from lit_icl.ops import (
    CHUNK_SIZE,
    linear_attention_chunked,
    linear_attention_chunked_autograd,
    linear_attention_quadratic,
)
from lit_icl.ops.fla import fla_naive

from lit_icl.experiments.bench.evaluation_cost import EVALUATION_FULL, EVALUATION_QUICK, bench_evaluation, evaluation_table
from lit_icl.experiments.bench.recurrent import (
    RECURRENT_FULL,
    RECURRENT_QUICK,
    bench_recurrent,
    recurrent_table,
    recurrent_targets,
)
from lit_icl.experiments.bench.step_cost import (
    HEAD_FULL,
    HEAD_QUICK,
    MFU_FULL,
    MFU_QUICK,
    bench_head,
    bench_mfu,
    head_table,
    mfu_table,
)
from lit_icl.experiments.bench.timing import alternate, fmt_s, fwd_bwd, knobs, machine, matmul_check, med, peak_memory, ratio

FULL = dict(B=4, H=8, D=64, kernel_T=(512, 2048, 8192), chunks=(16, 32, 64, 128, 256), quadratic_max_T=2048,
            mm_n=2048, train_T=(1024, 4096), train_tokens=16384, demos=(8, 32, 128), shots=(0, 8, 32, 128),
            episodes=16, queries=64, reps=5, recurrent=RECURRENT_FULL, evaluation=EVALUATION_FULL,
            head=HEAD_FULL, mfu=MFU_FULL)
QUICK = dict(B=1, H=2, D=16, kernel_T=(32, 64, 256), chunks=(16, 64), quadratic_max_T=256,
             mm_n=256, train_T=(64, 128), train_tokens=512, demos=(2, 4, 8), shots=(0, 2, 8),
             episodes=4, queries=8, reps=2, recurrent=RECURRENT_QUICK, evaluation=EVALUATION_QUICK,
             head=HEAD_QUICK, mfu=MFU_QUICK)
README_BEGIN, README_END = "<!-- bench:start -->", "<!-- bench:end -->"  # the README's generated table
AUTOGRAD_CHUNK = 64  # the plain-autograd reference at its own former default
LM = dict(n_layer=2, n_head=4, n_embd=128, token_shift=True)  # configs/quickstart.yaml
VOCAB, N_KEYS = 65, 32  # recall vocabulary: keys 1..32, values 33..64


def attention_inputs(cfg: dict, T: int) -> dict[str, torch.Tensor]:
    """Raw q, k, v for softmax and feature-mapped fq = elu(q) + 1, fk for linear attention."""
    g = torch.Generator().manual_seed(T)
    raw = [torch.randn(cfg["B"], cfg["H"], T, cfg["D"], generator=g) for _ in range(3)]
    phi = [(F.elu(x) + 1).requires_grad_() for x in raw[:2]]
    return dict(q=raw[0].requires_grad_(), k=raw[1].requires_grad_(), v=raw[2].requires_grad_(), fq=phi[0], fk=phi[1])


def kernel_contenders(cfg: dict, T: int, chunk_size: int = CHUNK_SIZE) -> dict[str, Callable[[], None]]:
    """Forward+backward closures of every attention form at length T."""
    x = attention_inputs(cfg, T)
    q, k, v, fq, fk = x["q"], x["k"], x["v"], x["fq"], x["fk"]
    fns = {
        "chunked": fwd_bwd(lambda a, b, c: linear_attention_chunked(a, b, c, chunk_size=chunk_size)[0], fq, fk, v),
        f"chunked (autograd, C={AUTOGRAD_CHUNK})": fwd_bwd(
            lambda a, b, c: linear_attention_chunked_autograd(a, b, c, chunk_size=AUTOGRAD_CHUNK)[0], fq, fk, v),
        "sdpa (softmax)": fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), q, k, v),
    }
    if T <= cfg["quadratic_max_T"]:
        fns["quadratic"] = fwd_bwd(lambda a, b, c: linear_attention_quadratic(a, b, c)[0], fq, fk, v)
    naive = fla_naive("linear_attn")
    if naive is not None and T % 64 == 0:  # its chunk size is fixed at 64
        t = lambda a: a.transpose(1, 2)
        fns["fla naive chunk"] = fwd_bwd(
            lambda a, b, c: naive.naive_chunk_linear_attn(t(a), t(b), t(c), scale=1.0, normalize=True), fq, fk, v
        )
    return fns


def bench_kernels(cfg: dict) -> dict:
    out = {}
    for T in cfg["kernel_T"]:
        times = alternate(kernel_contenders(cfg, T), cfg["reps"])
        out[T] = {name: {"median_s": med(ts), "vs_chunked": ratio(times, name, "chunked"), "times_s": ts}
                  for name, ts in times.items()}
    mid, long = cfg["kernel_T"][-2:]
    scaling = alternate({T: kernel_contenders(cfg, T)["chunked"] for T in (mid, long)}, cfg["reps"])
    sweep = {T: alternate({C: kernel_contenders(cfg, T, C)["chunked"] for C in cfg["chunks"]}, cfg["reps"])
             for T in (mid, long)}
    return {"by_T": out, "scaling": {"T": [mid, long], "ratio": ratio(scaling, long, mid), "times_s": scaling},
            "chunk_sweep": {T: {C: med(ts) for C, ts in times.items()} for T, times in sweep.items()}}


def chunked_flops(B: int, H: int, T: int, F_: int, D: int, C: int) -> float:
    """Matmul FLOPs of the chunked form, forward + backward = 3 x forward (the backward's two
    products per forward product; its recomputation is not counted). Forward per token:
    2 (C F + C (D+1) + 2 F (D+1)) for q k^T, A v', q U and k^T v' (full C x C blocks)."""
    return 3 * 2 * B * H * T * (C * F_ + C * (D + 1) + 2 * F_ * (D + 1))


def bench_flops(cfg: dict) -> dict:
    """The chunked kernel at the longest T alternating with torch.mm of two n x n matrices."""
    T, n = cfg["kernel_T"][-1], cfg["mm_n"]
    a, b = torch.randn(n, n), torch.randn(n, n)
    times = alternate({"mm": lambda: torch.mm(a, b), "chunked": kernel_contenders(cfg, T)["chunked"]}, cfg["reps"] + 2)
    mm_rate = 2 * n**3 / med(times["mm"]) / 1e9
    rate = chunked_flops(cfg["B"], cfg["H"], T, cfg["D"], cfg["D"], CHUNK_SIZE) / med(times["chunked"]) / 1e9
    return {"T": T, "mm_n": n, "mm_gflops": mm_rate, "chunked_gflops": rate, "fraction": rate / mm_rate}


def lm(block_size: int, **overrides) -> TransformerLM:
    """A quickstart-size model (random weights: timing does not depend on them)."""
    torch.manual_seed(0)
    return TransformerLM(TransformerConfig(vocab_size=VOCAB, block_size=block_size, **{**LM, **overrides}))


def bench_training(cfg: dict) -> dict:
    kinds = {"linear": {}, "linear+momentum": {"momentum": 0.5}, "softmax": {"attention": "softmax"},
             **{kind: {"attention": kind} for kind in ("retention", "simple_gla", "gla", "deltanet")}}
    out = {}
    for T in cfg["train_T"]:
        B = max(1, cfg["train_tokens"] // T)
        ids = torch.randint(0, VOCAB, (B, T + 1), generator=torch.Generator().manual_seed(0))
        steps = {}
        for name, kw in kinds.items():
            model = lm(T, **kw)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

            def step(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                logits = model(ids[:, :-1])
                F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
                opt.step()

            steps[name] = step
        times = alternate(steps, cfg["reps"])
        out[T] = {name: {"B": B, "median_s": med(ts), "tokens_per_s": B * T / med(ts),
                         "peak_bytes": peak_memory(steps[name]), "vs_linear": ratio(times, name, "linear"),
                         "times_s": ts} for name, ts in times.items()}
    return out


def demonstrations(n_episodes: int, n_demos: int, seed: int = 0) -> torch.Tensor:
    """[E, n, 2] key -> value pairs of the recall task, one demonstration per row."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(1, N_KEYS + 1, (n_episodes, n_demos), generator=g)
    return torch.stack([keys, keys + N_KEYS], dim=-1)


def bench_conversion(cfg: dict) -> dict:
    model = lm(2 * max(cfg["demos"]) + 8).eval()
    E, out = cfg["episodes"], {}
    for n in cfg["demos"]:
        demos = demonstrations(E, n)
        times = alternate({
            "convert": lambda: convert(model, demos[0].reshape(1, -1)),
            "convert batched": lambda: convert(model, demos.reshape(E, -1)),
            "finetune": lambda: finetune(model, demos[0]),
            "finetune batched": lambda: finetune_batched(model, demos),
        }, cfg["reps"])
        per_episode = {"convert batched": E, "finetune batched": E}
        out[n] = {name: {"median_s": med(ts) / per_episode.get(name, 1), "times_s": ts} for name, ts in times.items()}
        out[n]["finetune / convert"] = ratio(times, "finetune", "convert")
        out[n]["finetune batched / convert batched"] = ratio(times, "finetune batched", "convert batched")
    return out


def bench_inference(cfg: dict) -> dict:
    model = lm(2 * max(cfg["shots"]) + 8).eval()
    Q = cfg["queries"]
    queries = demonstrations(1, Q, seed=1)[0]  # [Q, 2]: a key and its value
    converted, prompted = {}, {}  # each group alternates within itself
    for n in cfg["shots"]:
        prompt = demonstrations(1, n).reshape(1, -1)
        state = convert(model, prompt)
        full = torch.cat([prompt.expand(Q, -1), queries], dim=1)
        converted[f"converted {n}"] = lambda state=state: model(queries, state=state)
        prompted[f"prompted {n}"] = lambda full=full: model(full)
    with torch.no_grad():
        times = {**alternate(converted, cfg["reps"] * 4), **alternate(prompted, cfg["reps"] * 2)}
    lo, hi = min(cfg["shots"]), max(cfg["shots"])
    return {"per_query_s": {name: med(ts) / Q for name, ts in times.items()}, "queries": Q,
            "converted hi/lo": ratio(times, f"converted {hi}", f"converted {lo}"),
            "prompted hi/lo": ratio(times, f"prompted {hi}", f"prompted {lo}"), "times_s": times}


def targets(cfg: dict, r: dict) -> list[dict]:
    """The issues' targets of the sections that ran, each with its measured value and whether it is met."""
    mid, long = cfg["kernel_T"][-2:]
    rows = []
    if "kernels" in r:
        k = r["kernels"]["by_T"]
        rows += [(f"chunked vs SDPA, fwd+bwd, T={mid}", k[mid]["sdpa (softmax)"]["vs_chunked"], ">=", 3.0),
                 (f"chunked vs SDPA, fwd+bwd, T={long}", k[long]["sdpa (softmax)"]["vs_chunked"], ">=", 6.0)]
        if "fla naive chunk" in k[mid]:
            rows += [(f"chunked vs fla naive chunk, T={mid}", k[mid]["fla naive chunk"]["vs_chunked"], ">=", 1.5),
                     (f"chunked vs fla naive chunk, T={long}", k[long]["fla naive chunk"]["vs_chunked"], ">=", 2.0)]
        rows.append((f"linear in T: time(T={long}) / time(T={mid})", r["kernels"]["scaling"]["ratio"], "<=", 4.5))
    if "flops" in r:
        rows.append((f"fraction of matmul rate, T={long}", r["flops"]["fraction"], ">=", 0.35))
    if "training" in r:
        rows += [(f"momentum step / linear step, T={T}", v["linear+momentum"]["vs_linear"], "<=", 1.10)
                 for T, v in r["training"].items()]
    if "conversion" in r:
        n32 = sorted(r["conversion"], key=lambda n: abs(n - 32))[0]
        rows.append((f"finetune / convert, {n32} demonstrations", r["conversion"][n32]["finetune / convert"],
                     ">=", 100.0))
    if "inference" in r:
        rows.append(("converted per-query cost, most / no demonstrations", r["inference"]["converted hi/lo"],
                     "<=", 1.2))
    if "recurrent" in r:
        rows += recurrent_targets(cfg, r["recurrent"])
    return [{"target": name, "measured": value, "want": f"{op} {bound:g}",
             "met": value >= bound if op == ">=" else value <= bound} for name, value, op, bound in rows]


def kernels_table(cfg: dict, r: dict) -> list[str]:
    k = r["kernels"]["by_T"]
    names = list(k[cfg["kernel_T"][-2]])
    lines = [f"**1. Attention forward+backward** (B={cfg['B']}, H={cfg['H']}, head dim {cfg['D']}, float32; "
             f"chunk {CHUNK_SIZE}; median time, x = time / chunked)", "",
             "| T | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for T, row in k.items():
        cells = [f"{fmt_s(row[n]['median_s'])} ({row[n]['vs_chunked']:.1f}x)" if n in row else "-" for n in names]
        lines.append(f"| {T} | " + " | ".join(cells) + " |")
    sweep = r["kernels"]["chunk_sweep"]
    lines += ["", "Chunk size of the chunked kernel (forward+backward, median):", "",
              "| T | " + " | ".join(f"C={C}" for C in cfg["chunks"]) + " |", "|---" * (len(cfg["chunks"]) + 1) + "|"]
    return lines + [f"| {T} | " + " | ".join(fmt_s(row[C]) for C in cfg["chunks"]) + " |" for T, row in sweep.items()]


def flops_table(cfg: dict, r: dict) -> list[str]:
    f = r["flops"]
    return [f"**2. Throughput**: chunked at T={f['T']}: {f['chunked_gflops']:.1f} GFLOP/s "
            f"(3 x forward matmul FLOPs) vs torch.mm {f['mm_n']}^2: {f['mm_gflops']:.1f} GFLOP/s "
            f"= {100 * f['fraction']:.0f}% of the matmul rate"]


def training_table(cfg: dict, r: dict) -> list[str]:
    lines = [f"**3. Training step** (quickstart size: {LM['n_layer']} layers, {LM['n_head']} heads, "
             f"width {LM['n_embd']}; AdamW)", "",
             "| T | B | model | step | tokens/s | peak RSS growth | vs linear |", "|---|---|---|---|---|---|---|"]
    for T, row in r["training"].items():
        for name, v in row.items():
            mem = "n/a" if v["peak_bytes"] is None else f"{v['peak_bytes'] / 2**20:.0f} MiB"
            lines.append(f"| {T} | {v['B']} | {name} | {fmt_s(v['median_s'])} | {v['tokens_per_s']:,.0f} | {mem} "
                         f"| {v['vs_linear']:.2f}x |")
    return lines


def conversion_table(cfg: dict, r: dict) -> list[str]:
    lines = [f"**4. Conversion vs finetuning** (per episode; batched: {cfg['episodes']} episodes at once; "
             "a demonstration is a key -> value pair)", "",
             "| demos | convert | convert batched | finetune (SGD, batch 1) | finetune batched | finetune / convert "
             "| batched / batched |", "|---|---|---|---|---|---|---|"]
    for n, v in r["conversion"].items():
        cells = (fmt_s(v[x]["median_s"]) for x in ("convert", "convert batched", "finetune", "finetune batched"))
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {v['finetune / convert']:,.0f}x "
                     f"| {v['finetune batched / convert batched']:,.0f}x |")
    return lines


def inference_table(cfg: dict, r: dict) -> list[str]:
    inf = r["inference"]
    lines = [f"**5. Inference per query** ({inf['queries']} queries of 2 tokens per call)", "",
             "| demos | converted context | prompt |", "|---|---|---|"]
    for n in cfg["shots"]:
        per = inf["per_query_s"]
        lines.append(f"| {n} | {fmt_s(per[f'converted {n}'])} | {fmt_s(per[f'prompted {n}'])} |")
    return lines + ["", f"From {min(cfg['shots'])} to {max(cfg['shots'])} demonstrations the prompted cost grows "
                    f"{inf['prompted hi/lo']:.1f}x, the converted {inf['converted hi/lo']:.2f}x."]


def table(cfg: dict, r: dict) -> str:
    m = r["meta"]
    check = ", ".join(f"{v:.0f} GFLOP/s at {k}" for k, v in m["mm_check_gflops"].items())
    lines = [f"Machine: {m['machine']}; torch {m['torch']}, {m['threads']} threads; {m['environment']}; "
             f"load check, torch.mm 1024^2: {check}",
             f"Date: {m['date']}; command: `{m['command']}`; wall time {m['wall_s']:.0f} s"
             + ("; QUICK smoke run, targets not meaningful" if m["quick"] else "")]
    for key, (_, section_table) in SECTIONS.items():
        if key in r:
            lines += ["", *section_table(cfg, r)]
    lines += ["", "**Targets**", "", "| target | measured | want | |", "|---|---|---|---|"]
    for t in r["targets"]:
        lines.append(f"| {t['target']} | {t['measured']:.2f} | {t['want']} | {'met' if t['met'] else 'NOT met'} |")
    return "\n".join(lines)


SECTIONS = {  # name: (run(cfg) -> results, table(cfg, all results) -> markdown lines)
    "kernels": (bench_kernels, kernels_table), "flops": (bench_flops, flops_table),
    "training": (bench_training, training_table), "conversion": (bench_conversion, conversion_table),
    "inference": (bench_inference, inference_table),
    "recurrent": (bench_recurrent, lambda cfg, r: recurrent_table(cfg, r["recurrent"])),
    "evaluation": (bench_evaluation, lambda cfg, r: evaluation_table(cfg, r["evaluation"])),
    "head": (bench_head, lambda cfg, r: head_table(cfg, r["head"])),
    "mfu": (bench_mfu, lambda cfg, r: mfu_table(cfg, r["mfu"])),
}


def run(cfg: dict, sections=tuple(SECTIONS), quick: bool = False, command: str = "", threads: int | None = None) -> dict:
    """Run the named sections with the shapes of `cfg` (FULL or QUICK) and check the targets: the
    results, with the machine and the command line in "meta". `threads`: torch's intra-op threads."""
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    r = {"meta": {"machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "quick": quick, "chunk_size": CHUNK_SIZE, "fla_naive": fla_naive("linear_attn") is not None,
                  "mm_check_gflops": matmul_check(), "environment": knobs(),
                  "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
                  "command": command}}
    for key in sections:
        r[key] = SECTIONS[key][0](cfg)
        print(f"[bench] {key} done at {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    r["targets"] = targets(cfg, r)
    r["meta"]["wall_s"] = time.perf_counter() - start
    return r


def write_readme(readme: str, cfg: dict, r: dict) -> None:
    """Rewrite the table between the bench markers of `readme` (README.md)."""
    from lit_icl.files import replace_marked_block

    replace_marked_block(readme, README_BEGIN, README_END, f"{README_BEGIN}\n{table(cfg, r)}\n{README_END}")
