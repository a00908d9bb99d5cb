"""Figures for TensorBoard and reports (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def accuracy_vs_shots(results: dict[int, dict[str, float]]):
    """Accuracy (%) against the number of demonstrations, one line per prediction (zero-shot,
    prompted, converted, finetuned, and approximate conversions): results[k][f"{name}_acc"]."""
    shots = sorted(results)
    names = [n.removesuffix("_acc") for n in results[shots[0]] if n.endswith("_acc")]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    styles = {"zero_shot": (":", "o"), "prompted": ("-", "s"), "finetuned": ("-.", "^")}
    for name in names:
        ls, marker = styles.get(name, ("--", "x"))
        label = "prompted (ICL)" if name == "prompted" else name.replace("_", " ")
        ax.plot(shots, [100 * results[k][f"{name}_acc"] for k in shots], ls, marker=marker, label=label)
    ax.set_xlabel("demonstrations (shots)")
    ax.set_ylabel("accuracy on held-out episodes (%)")
    ax.set_xticks(shots)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def loss_vs_position(history: list[tuple[int, list[float]]], marks: tuple[int, ...] = ()):
    """Mean held-out loss against token position (log scale), one curve per measurement
    (history: (step, loss per position 1..L)), darker for later steps; dotted lines at `marks`
    (the ICL score's positions)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    cmap = plt.get_cmap("viridis")
    for i, (step, losses) in enumerate(history):
        color = cmap(i / max(1, len(history) - 1))
        ax.plot(range(1, len(losses) + 1), losses, color=color, lw=1, label=f"step {step}")
    for m in marks:
        ax.axvline(m, ls=":", color="gray", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("token position (tokens of context)")
    ax.set_ylabel("held-out loss (nats)")
    ax.grid(alpha=0.3)
    if len(history) <= 12:
        ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    return fig
