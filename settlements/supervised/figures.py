"""The confusion-matrix figure: one row-normalised panel per method, counts written in each cell."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap  # noqa: E402

from ..palette import RAMP_COLOURS  # noqa: E402
from ..store import atomic_path  # noqa: E402


def confusion_figure(path: Path, confusion: pd.DataFrame, classes: list[str], scores: pd.DataFrame,
                     title: str, truth: str = "reference") -> None:
    """``confusion``: method, true, predicted, count; ``scores``: method, class, f1 (for the titles); ``truth``:
    what the rows are (the reference, or the training labels themselves). ``title`` is also the PNG's own
    Title, which image viewers and tests read."""
    methods = list(dict.fromkeys(confusion["method"]))
    cmap = LinearSegmentedColormap.from_list("ramp", list(RAMP_COLOURS))
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 0.8, 4.2), squeeze=False,
                             layout="constrained")
    n = len(classes)
    for ax, method in zip(axes[0], methods, strict=True):
        c = confusion[confusion["method"] == method]
        m = c.pivot(index="true", columns="predicted", values="count").reindex(index=classes, columns=classes)
        counts = m.fillna(0).to_numpy(dtype=np.int64)
        rows = counts.sum(axis=1, keepdims=True)
        share = np.divide(counts, np.where(rows > 0, rows, 1))
        ax.imshow(share, cmap=cmap, vmin=0, vmax=1)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                        color=RAMP_COLOURS[0] if share[i, j] > 0.5 else RAMP_COLOURS[1])
        ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel(truth, fontsize=8)
        f1 = scores[(scores["method"] == method) & (scores["class"] == "macro avg")]["f1"]
        ax.set_title(f"{method}\nmacro F1 {float(f1.iloc[0]):.3f}" if len(f1) else method, fontsize=9)
    fig.suptitle(title, fontsize=10)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png", metadata={"Title": " ".join(title.split())})
    plt.close(fig)
