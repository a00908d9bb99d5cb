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
