"""Figures for evaluation: a confusion matrix that stays readable with 80+ classes, and a reliability diagram."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _figure(**kwargs):
    # matplotlib's object API: no pyplot, so no process-wide backend switch or figure registry to clean up.
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def top_confusions(cm: np.ndarray, classes: list[str], n: int = 20) -> list[dict]:
    """The `n` largest off-diagonal cells of a count confusion matrix, largest first (ties: by class order)."""
    off = np.array(cm, dtype=np.int64, copy=True)
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:n]
    support = cm.sum(axis=1)
    out = []
    for f in flat:
        t, p = np.unravel_index(f, off.shape)
        if off[t, p] <= 0:
            break
        out.append(
            {
                "true": classes[t],
                "pred": classes[p],
                "count": int(off[t, p]),
                "share_of_true": round(float(off[t, p] / support[t]), 4),
            }
        )
    return out


def plot_confusion(cm: np.ndarray, classes: list[str], path: str | Path, title: str = "", annotate: int = 10) -> None:
    """Row-normalised confusion matrix as an image (no per-cell numbers, which are unreadable past ~20 classes).

    The `annotate` largest off-diagonal cells are circled and labelled "true→pred n", so the mistakes that matter
    are named even when the class names on the axes are too small to read.
    """
    k = len(classes)
    support = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, support, out=np.zeros(cm.shape, dtype=float), where=support > 0)
    side = float(np.clip(4 + 0.11 * k, 6, 22))
    fig = _figure(figsize=(side + 1.5, side))
    ax = fig.subplots()
    from matplotlib.colors import PowerNorm

    # Square-root colour scale: a 5% confusion stays visible next to a 95% diagonal.
    im = ax.imshow(norm, cmap="Blues", norm=PowerNorm(gamma=0.5, vmin=0, vmax=1), interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="share of the true class (square-root scale)")
    font = float(np.clip(300 / max(k, 1), 4, 9))
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(classes, rotation=90, fontsize=font)
    ax.set_yticklabels(classes, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    index = {c: i for i, c in enumerate(classes)}
    for j, c in enumerate(top_confusions(cm, classes, annotate)):
        t, p = index[c["true"]], index[c["pred"]]
        ax.plot(p, t, "o", ms=10, mfc="none", mec="red", mew=1.2)
        # Labels point toward the middle (never off the axes) and step up/down so neighbours do not overlap.
        dx = (0.04 * k + 0.8) * (1 if p < (k - 1) / 2 else -1)
        ax.annotate(
            f"{c['true']}→{c['pred']} {c['count']}",
            (p, t),
            (p + dx, t + 0.02 * k * ((j % 3) - 1)),
            fontsize=7,
            color="darkred",
            ha="left" if dx > 0 else "right",
            va="center",
            arrowprops={"arrowstyle": "-", "color": "red", "lw": 0.6},
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
        )
    ax.set_title(title or f"confusion matrix, row-normalised ({k} classes, n={int(cm.sum())})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_reliability(
    bins_before: dict, bins_after: dict, ece_before: float, ece_after: float, temperature: float, path: str | Path
) -> None:
    """Accuracy against confidence per bin, before and after temperature scaling, with bin counts below."""
    fig = _figure(figsize=(9, 5.5))
    axes = fig.subplots(2, 2, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    for col, (bins, name, ece) in enumerate(
        ((bins_before, "before", ece_before), (bins_after, f"after (T={temperature:.3g})", ece_after))
    ):
        edges = bins["edges"]
        mid = (edges[:-1] + edges[1:]) / 2
        width = edges[1] - edges[0]
        ok = bins["count"] > 0
        ax = axes[0, col]
        ax.bar(mid[ok], bins["accuracy"][ok], width=width * 0.95, color="tab:blue", alpha=0.8, label="accuracy")
        ax.bar(
            mid[ok],
            bins["confidence"][ok],
            width=width * 0.95,
            fill=False,
            edgecolor="tab:red",
            lw=1.2,
            label="mean confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}: ECE {ece:.4f}")
        ax.set_ylabel("accuracy")
        ax.legend(loc="upper left", fontsize=8)
        axes[1, col].bar(mid, bins["count"], width=width * 0.95, color="gray")
        axes[1, col].set_xlabel("confidence (top probability)")
        axes[1, col].set_ylabel("items")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
