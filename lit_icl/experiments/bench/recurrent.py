"""Section 6 of the benchmark (scripts/bench.py): the recurrent family's ops (retention, simple
GLA, GLA, DeltaNet), forward+backward, float32 on the CPU.

Per kind and T: the chunked form (`<kind>_chunked`, its default chunk size) against its recurrent
reference (`<kind>_recurrent`) and flash-linear-attention's pure-PyTorch chunked reference where
fla has one (retention: `naive_chunk_simple_gla` with the constant gate log gamma, the form fla's
own chunk_retention uses; simple GLA: `naive_chunk_simple_gla`; DeltaNet: `delta_rule_chunkwise`;
GLA: none). The slow references run up to `reference_max_T`; at the longest T the chunked form
alternates with itself at the middle T, for the linear-in-T ratio. A chunk-size sweep at one T.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from lit_icl.ops import delta_rule, gla, simple_gla
from lit_icl.ops.delta_rule import delta_rule_chunked, delta_rule_recurrent
from lit_icl.ops.fla import fla_naive
from lit_icl.ops.gla import gla_chunked, gla_recurrent
from lit_icl.ops.retention import retention_gamma, retention_log_gates, retention_recurrent
from lit_icl.ops.simple_gla import simple_gla_chunked, simple_gla_recurrent

from lit_icl.experiments.bench.timing import alternate, fmt_s, fwd_bwd, med, ratio

RECURRENT_FULL = dict(T=(512, 2048, 8192), reference_max_T=2048, chunks=(16, 32, 64, 128), sweep_T=2048, reps=3)
RECURRENT_QUICK = dict(T=(32, 64, 128), reference_max_T=64, chunks=(16, 32), sweep_T=64, reps=2)

# kind: (recurrent, chunked, default chunk size)
KINDS = {
    "retention": (retention_recurrent, lambda q, k, v, gamma, **kw: simple_gla_chunked(  # what the layer runs
        q, k, v, retention_log_gates(q, k, v, gamma), **kw), simple_gla.CHUNK_SIZE),
    "simple_gla": (simple_gla_recurrent, simple_gla_chunked, simple_gla.CHUNK_SIZE),
    "gla": (gla_recurrent, gla_chunked, gla.CHUNK_SIZE),
    "delta_rule": (delta_rule_recurrent, delta_rule_chunked, delta_rule.CHUNK_SIZE),
}


def kind_inputs(kind: str, B: int, H: int, T: int, D: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The leaves (q, k, v and the gate when it is trained) and retention's fixed gamma.
    Gates as the layers make them: logsigmoid (GLA: / 16, the paper's temperature), sigmoid
    betas, L2-normalised DeltaNet q and k."""
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    if kind == "retention":
        return [x.requires_grad_() for x in (q, k, v)], retention_gamma(H)
    if kind == "delta_rule":
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    gate = {"simple_gla": lambda: F.logsigmoid(torch.randn(B, H, T, generator=g)),
            "gla": lambda: F.logsigmoid(torch.randn(B, H, T, D, generator=g)) / 16,
            "delta_rule": lambda: torch.randn(B, H, T, generator=g).sigmoid()}[kind]()
    return [x.requires_grad_() for x in (q, k, v, gate)], None


def fla_chunk_reference(kind: str, T: int, gamma: torch.Tensor | None) -> Callable | None:
    """fla's pure-PyTorch chunked form as f(q, k, v[, gate]) -> o in lit_icl's layout, or None."""
    t = lambda x: x.transpose(1, 2)
    if kind in ("retention", "simple_gla") and fla_naive("simple_gla") is not None:
        chunk = fla_naive("simple_gla").naive_chunk_simple_gla
        if kind == "retention":
            return lambda q, k, v: t(chunk(t(q), t(k), t(v), t(gamma.log()[None, :, None].expand(q.shape[:3])))[0])
        return lambda q, k, v, g: t(chunk(t(q), t(k), t(v), t(g))[0])
    if kind == "delta_rule" and fla_naive("delta_rule") is not None and T % 32 == 0:
        return lambda q, k, v, b: fla_naive("delta_rule").delta_rule_chunkwise(q, k, v, b, chunk_size=32)[0]
    return None


def contenders(cfg: dict, kind: str, T: int, chunk_size: int | None = None, references: bool = True) -> dict:
    """Forward+backward closures of the chunked form (and the references) at length T."""
    recurrent, chunked, default = KINDS[kind]
    leaves, gamma = kind_inputs(kind, cfg["B"], cfg["H"], T, cfg["D"])
    gate = lambda a: a[3] if gamma is None else gamma
    C = chunk_size or default
    fns = {"chunked": fwd_bwd(lambda *a: chunked(*a[:3], gate(a), chunk_size=C)[0], *leaves)}
    if references:
        fns["recurrent"] = fwd_bwd(lambda *a: recurrent(*a[:3], gate(a))[0], *leaves)
        fla = fla_chunk_reference(kind, T, gamma)
        if fla is not None:
            fns["fla naive chunk"] = fwd_bwd(fla, *leaves)
    return fns


def bench_recurrent(cfg: dict) -> dict:
    rc, out = cfg["recurrent"], {}
    mid, long = rc["T"][-2:]
    for kind in KINDS:
        by_T, scaling = {}, None
        for T in rc["T"]:
            fns = contenders(cfg, kind, T, references=T <= rc["reference_max_T"])
            if T == long:
                fns[f"chunked T={mid}"] = contenders(cfg, kind, mid, references=False)["chunked"]
            times = alternate(fns, rc["reps"])
            if T == long:
                scaling = {"T": [mid, long], "ratio": ratio(times, "chunked", f"chunked T={mid}"),
                           "times_s": {long: times["chunked"], mid: times.pop(f"chunked T={mid}")}}
            by_T[T] = {name: {"median_s": med(ts), "vs_chunked": ratio(times, name, "chunked"), "times_s": ts}
                       for name, ts in times.items()}
        sweep = alternate({C: contenders(cfg, kind, rc["sweep_T"], C, references=False)["chunked"]
                           for C in rc["chunks"]}, rc["reps"])
        out[kind] = {"chunk_size": KINDS[kind][2], "by_T": by_T, "scaling": scaling,
                     "chunk_sweep": {C: med(ts) for C, ts in sweep.items()}}
    return out


def recurrent_targets(cfg: dict, r: dict) -> list[tuple]:
    """(name, measured, op, bound): chunked at least 1.5x faster than fla's naive chunked form at
    the middle T, and linear in T from the middle to the longest T."""
    mid, rows = cfg["recurrent"]["T"][-2], []
    for kind, v in r.items():
        if "fla naive chunk" in v["by_T"][mid]:
            rows.append((f"{kind}: chunked vs fla naive chunk, fwd+bwd, T={mid}",
                         v["by_T"][mid]["fla naive chunk"]["vs_chunked"], ">=", 1.5))
        s = v["scaling"]
        rows.append((f"{kind}: linear in T, time(T={s['T'][1]}) / time(T={s['T'][0]})", s["ratio"], "<=", 4.5))
    return rows


def recurrent_table(cfg: dict, r: dict) -> list[str]:
    rc, names = cfg["recurrent"], ("chunked", "recurrent", "fla naive chunk")
    lines = [f"**6. Recurrent family forward+backward** (B={cfg['B']}, H={cfg['H']}, head dim {cfg['D']}, "
             "float32; each kind's default chunk size; median time, x = time / chunked)", "",
             "| kind | T | " + " | ".join(names) + " |", "|---|---" + "|---" * len(names) + "|"]
    for kind, v in r.items():
        for T, row in v["by_T"].items():
            cells = [f"{fmt_s(row[n]['median_s'])} ({row[n]['vs_chunked']:.1f}x)" if n in row else "-" for n in names]
            lines.append(f"| {kind} (C={v['chunk_size']}) | {T} | " + " | ".join(cells) + " |")
    lines += ["", f"Chunk size of the chunked forms at T={rc['sweep_T']} (forward+backward, median):", "",
              "| kind | " + " | ".join(f"C={C}" for C in rc["chunks"]) + " |", "|---" * (len(rc["chunks"]) + 1) + "|"]
    lines += [f"| {kind} | " + " | ".join(fmt_s(v["chunk_sweep"][C]) for C in rc["chunks"]) + " |"
              for kind, v in r.items()]
    return lines
