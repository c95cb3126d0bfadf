"""The report's figures, drawn with matplotlib (Agg): samples, curves, predictions, confusion, per-class accuracy."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix  # noqa: E402

DPI = 100
CORRECT, WRONG = "#1a7f37", "#cf222e"


def _save(fig, path: Path) -> None:
    from .io import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI, bbox_inches=None))
    plt.close(fig)


def _show(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 3, H, W) -> (N, H, W, 3) for imshow."""
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1))


def samples(images: np.ndarray, labels: np.ndarray, classes: list[str], path: Path, cols: int = 8) -> None:
    """Preprocessed (resized, cropped) training images with their class names."""
    n = len(images)
    rows = max(1, int(np.ceil(n / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.5, rows * 1.7), squeeze=False)
    for ax, i in zip(axes.flat, range(rows * cols)):
        ax.axis("off")
        if i < n:
            ax.imshow(_show(images[i : i + 1])[0])
            ax.set_title(classes[labels[i]], fontsize=9)
    fig.suptitle("Training images as the backbone sees them (before normalization)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    _save(fig, path)


def curves(paper_rows: list[dict], path: Path, reported: list[dict] | None = None) -> None:
    """Loss and accuracy per epoch, train (solid) and test (dashed), one colour per view; mean over seeds.
    `reported`: the case study's own per-epoch train numbers, drawn as black stars."""
    rows = [r for r in paper_rows if r["head"] == "linear"]
    views = list(dict.fromkeys(r["view"] for r in rows))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.get_cmap("tab10")
    epochs = [e["epoch"] for e in reported] if reported else [1]
    if not rows:  # e.g. --heads logreg: no per-epoch curves to draw, only the case study's points
        ax_acc.text(0.5, 0.5, "no linear head in this report", ha="center", va="center", transform=ax_acc.transAxes)
    for k, view in enumerate(views):
        runs = [r["epochs"] for r in rows if r["view"] == view]
        epochs = [e["epoch"] for e in runs[0]]
        for key, style, label in (("train", "-", "train"), ("test", "--", "test")):
            loss = np.mean([[e[f"{key}_loss"] for e in run] for run in runs], axis=0)
            acc = 100 * np.mean([[e[f"{key}_acc"] for e in run] for run in runs], axis=0)
            ax_loss.plot(epochs, loss, style, marker="o", color=colors(k), label=f"{view} ({label})")
            ax_acc.plot(epochs, acc, style, marker="o", color=colors(k), label=f"{view} ({label})")
    if reported:
        ep = [e["epoch"] for e in reported]
        ax_loss.plot(ep, [e["train_loss"] for e in reported], "k*", markersize=11, label="case study (train)")
        ax_acc.plot(ep, [100 * e["train_acc"] for e in reported], "k*", markersize=11, label="case study (train)")
    for ax, name in ((ax_loss, "cross-entropy loss"), (ax_acc, "accuracy (%)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
    ax_acc.set_ylim(0, 100)
    ax_acc.legend(fontsize=8, loc="lower right", ncol=2)
    fig.suptitle("Case-study protocol: linear head, 2 epochs of Adam, mean over seeds; "
                 "train = over each epoch's mini-batches", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    _save(fig, path)


def predictions(images: np.ndarray, true: np.ndarray, pred: np.ndarray, prob: np.ndarray, classes: list[str],
                path: Path, title: str, cols: int = 6) -> None:
    """Test images with predicted and true labels; green border and 'ok' if right, red and 'WRONG' if not."""
    n = len(images)
    rows = max(1, int(np.ceil(n / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.0, rows * 2.6), squeeze=False)
    for ax, i in zip(axes.flat, range(rows * cols)):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        ok = pred[i] == true[i]
        color = CORRECT if ok else WRONG
        ax.imshow(_show(images[i : i + 1])[0])
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(4)
        ax.set_title(f"{'ok' if ok else 'WRONG'}: {classes[pred[i]]} {100 * prob[i]:.0f}%\ntrue: {classes[true[i]]}",
                     fontsize=8.5, color=color)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95), h_pad=1.2)
    _save(fig, path)


def confusion(true: np.ndarray, pred: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    """Row-normalized confusion matrix (percent of each true class)."""
    k = len(classes)
    cm = confusion_matrix(true, pred, labels=np.arange(k), normalize="true") * 100
    size = max(6.0, 0.62 * k + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    ConfusionMatrixDisplay(cm, display_labels=classes).plot(ax=ax, cmap="Blues", values_format=".0f",
                                                           xticks_rotation=45, colorbar=True)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (row sums to 100 %)")
    fig.tight_layout()
    _save(fig, path)


def per_class(acc: dict[str, np.ndarray], classes: list[str], path: Path, title: str) -> None:
    """Per-class test accuracy, one bar per view, side by side."""
    views = list(acc)
    k = len(classes)
    width = 0.8 / max(1, len(views))
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * k + 2), 4.5))
    colors = plt.get_cmap("tab10")
    for j, view in enumerate(views):
        ax.bar(np.arange(k) + (j - (len(views) - 1) / 2) * width, 100 * acc[view], width, label=view,
               color=colors(j))
    ax.set_xticks(np.arange(k))
    ax.set_xticklabels(classes, rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="view")
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    _save(fig, path)
