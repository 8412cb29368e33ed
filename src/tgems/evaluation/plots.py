"""Trade-off figure: accuracy vs compute for every method, exit-layer histogram, exits by difficulty."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

STYLE = {"full": ("black", "*"), "lens": ("silver", "x"), "static": ("grey", "s"), "probe": ("tab:orange", "^"),
         "sample": ("tab:green", "v"), "tgem_cls": ("tab:blue", "o"), "tgem_rates": ("tab:purple", "D"),
         "oracle": ("tab:red", "P")}


def _rows(results, method, split):
    return [r for r in results if r["method"] == method and r["split"] == split]


def tradeoff_plot(report: dict, path, split: str = "all", title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    L = report["num_layers"]
    splits = [s for s in ("seen", "heldout") if any(r["split"] == s for r in results)] or ["all"]
    fig, axes = plt.subplots(1, len(splits) + 2, figsize=(5 * (len(splits) + 2), 4.2))
    for ax, sp in zip(axes, splits):
        for m, (c, mk) in STYLE.items():
            rows = sorted(_rows(results, m, sp), key=lambda r: r["mean_layers"])
            if not rows:
                continue
            x = [r["mean_layers"] / L for r in rows]
            y = [100 * r["accuracy"] for r in rows]
            ls = "none" if m in ("full", "oracle") else "-"
            ax.plot(x, y, color=c, marker=mk, ls=ls, label=m, ms=9 if m in ("full", "oracle") else 5)
        ax.set_xlabel("mean executed layers / L")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"{sp} classes")
        ax.grid(alpha=0.3)
        ax.set_xlim(0, 1.05)
    axes[0].legend(fontsize=8, loc="lower right")

    ex = report.get("extras", {}).get("exit_layers") or {}
    layers = np.asarray(ex.get("layers", []))
    ax = axes[len(splits)]
    if len(layers):
        ax.hist(layers, bins=np.arange(0.5, L + 1.5), color="tab:blue", rwidth=0.85)
        ax.set_title(f"T-GEM exit layers (budget {ex.get('budget')})")
        ax.set_xlabel("exit layer")
        ax.set_ylabel("images")
    ax = axes[len(splits) + 1]
    diff = report.get("extras", {}).get("difficulty")
    if diff is not None and len(layers):
        diff = np.asarray(diff)
        edges = np.quantile(diff, np.linspace(0, 1, 6))
        idx = np.clip(np.searchsorted(edges, diff, side="right") - 1, 0, 4)
        means = [layers[idx == b].mean() for b in range(5)]
        ax.bar(range(5), means, color="tab:blue")
        ax.set_xticks(range(5), ["easiest", "2", "3", "4", "hardest"])
        ax.set_ylabel("mean exit layer")
        ax.set_title("T-GEM exit layer by difficulty quintile")
    else:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
