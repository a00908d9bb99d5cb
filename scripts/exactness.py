#!/usr/bin/env python
"""Prompted vs converted logits for every registered attention kind and two hybrids: a table.

    .venv/bin/python scripts/exactness.py

A random 2-layer model per kind (width 16, 2 heads, RoPE, chunk 4), 4 rows of 23 demonstration
tokens then 7 query tokens (lengths that do not fill whole chunks, so the converted run is not
the prompted run's arithmetic in the same order). Columns: the largest |prompted - converted|
logit in float64, the relative error ||prompted - converted|| / ||prompted|| in float32, and the
baked model's float64 difference, each without and with momentum (eta = 0.6); and under
bf16-mixed (float32 weights, torch.autocast to bfloat16, as --trainer.precision bf16-mixed
trains) the relative error of converted vs prompted next to the bf16 prompted logits' own
distance from float32's (the rounding bf16 brings anyway). The tests assert the float bounds
(tests/test_context.py); this prints the figures.
"""
from __future__ import annotations

import torch

from lit_icl import TransformerConfig, TransformerLM, bake, convert
from lit_icl.mixers import MIXERS

V, M, Q = 40, 23, 7
HYBRIDS = (["gla", "softmax"], ["deltanet", "simple_gla"])


def model(attention, eta: float, dtype: torch.dtype) -> TransformerLM:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=16, block_size=64, chunk_size=4,
                            attention=attention, momentum=eta, position="rope")
    return TransformerLM(cfg).to(dtype).eval()


def main() -> None:
    g = torch.Generator().manual_seed(1)
    demo, query = torch.randint(1, V, (4, M), generator=g), torch.randint(1, V, (4, Q), generator=g)
    print("| kind | float64 max abs diff (eta 0 / 0.6) | float32 relative error (eta 0 / 0.6) | baked, float64 | "
          "bf16-mixed relative error, converted vs prompted (eta 0 / 0.6) | bf16 vs float32 prompted |")
    print("|---|---|---|---|---|---|")
    for attention in [*MIXERS, *HYBRIDS]:
        cells: dict[str, list[str]] = {"64": [], "32": [], "bake": [], "bf16": [], "bf16_vs_32": []}
        for eta in (0.0, 0.6):
            for dtype in (torch.float64, torch.float32):
                m = model(attention, eta, dtype)
                prompted = m(torch.cat([demo, query], 1))[:, M:]
                state = convert(m, demo)
                converted = m(query, state=state)
                if dtype == torch.float64:
                    cells["64"].append(f"{(prompted - converted).abs().max().item():.1e}")
                    cells["bake"].append(f"{(bake(m, state)(query) - prompted).abs().max().item():.1e}")
                else:
                    cells["32"].append(f"{((prompted - converted).norm() / prompted.norm()).item():.1e}")
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        low = m(torch.cat([demo, query], 1))[:, M:].float()
                        low_converted = m(query, state=convert(m, demo)).float()
                    cells["bf16"].append(f"{((low - low_converted).norm() / low.norm()).item():.1e}")
                    cells["bf16_vs_32"].append(f"{((low - prompted).norm() / prompted.norm()).item():.1e}")
        name = "+".join(attention) if isinstance(attention, list) else attention
        print(f"| {name} | " + " | ".join(" / ".join(c) for c in cells.values()) + " |")


if __name__ == "__main__":
    main()
