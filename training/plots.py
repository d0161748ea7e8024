"""PNG plots of the evaluation reports (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str, path: Path) -> None:
    """``curves``: name -> (y_true, scores)."""
    from sklearn.metrics import roc_curve

    from training.metrics import roc_auc

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (y, s) in curves.items():
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(y, s):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion_matrix(matrix: list[list[int]], title: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 3.6))
    data = np.asarray(matrix)
    ax.imshow(data, cmap="Blues")
    for (i, j), value in np.ndenumerate(data):
        ax.text(j, i, f"{value:,}", ha="center", va="center",
                color="white" if value > data.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["negative", "positive"],
           yticklabels=["negative", "positive"], xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def p_positive_histograms(sets: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """One panel per prompt set, one histogram per scorer."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.6), squeeze=False)
    bins = np.linspace(0, 1, 21)
    for ax, (set_name, scorers) in zip(axes[0], sets.items()):
        for scorer, values in scorers.items():
            ax.hist(values, bins=bins, alpha=0.55, label=f"{scorer} (mean {np.mean(values):.2f})")
        ax.set(xlabel="P(positive)", ylabel="generated reviews", title=set_name, xlim=(0, 1))
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
