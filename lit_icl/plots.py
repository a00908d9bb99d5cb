"""Figures for TensorBoard and reports (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def accuracy_vs_shots(results: dict[int, dict[str, float]], converted: str = "converted"):
    """Accuracy (%) against the number of demonstrations: one line per prediction
    (zero-shot, prompted, converted, finetuned). results[k][f"{name}_acc"] in [0, 1]."""
    shots = sorted(results)
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    styles = [("zero_shot", "zero-shot", ":", "o"), ("prompted", "prompted (ICL)", "-", "s"),
              (converted, converted.replace("_", " "), "--", "x"), ("finetuned", "finetuned", "-.", "^")]
    for name, label, ls, marker in styles:
        ax.plot(shots, [100 * results[k][f"{name}_acc"] for k in shots], ls, marker=marker, label=label)
    ax.set_xlabel("demonstrations (shots)")
    ax.set_ylabel("accuracy on held-out episodes (%)")
    ax.set_xticks(shots)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig
