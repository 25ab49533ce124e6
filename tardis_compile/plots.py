"""Report plots: what the fit did, for people reading the report.

* ``<stem>.gelu.png``: for sample neurons of the first blocks, the block's own GELU, the fitted line
  ``α·h + β``, the range ``[lo, hi]`` (shaded) and the calibrated density of ``h`` — the picture of
  "GELU is a straight line inside each neuron's usual range";
* ``<stem>.layers.png``: per block, the calibrated and measured fallback (flagged) share and the
  measured relative error of the block output.

matplotlib is optional (the ``bench`` extra): without it no plot is written and the report says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tardis_compile import modelio
from tardis_compile.fit import Lines
from tardis_compile.gelu import gelu
from tardis_compile.histogram import NeuronStats

SAMPLE_BLOCKS = 3


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _samples(lines: Lines) -> list[int]:
    """A typical neuron (median out-of-range share) and the one with the most samples outside."""
    outside = 1.0 - lines.coverage
    order = np.argsort(outside)
    return list(dict.fromkeys([int(order[len(order) // 2]), int(order[-1])]))


def _gelu_panel(ax, stats: NeuronStats, lines: Lines, j: int, title: str) -> None:
    counts = stats.moments[0, j]
    edges = stats.grid.edges()
    cum = np.cumsum(counts) / max(counts.sum(), 1.0)
    lo_q, hi_q = np.searchsorted(cum, 0.001), np.searchsorted(cum, 0.999)
    left = edges[max(lo_q, 1)]
    right = edges[min(hi_q + 1, len(edges) - 2)]
    pad = 0.1 * (right - left) + 1e-3
    h = np.linspace(left - pad, right + pad, 400)
    ax.plot(h, gelu(h, stats.variant), color="black", lw=1.5, label="GELU")
    ax.plot(h, lines.alpha[j] * h + lines.beta[j], color="tab:red", lw=1.2, ls="--", label="fitted line")
    lo, hi = max(lines.lo[j], h[0]), min(lines.hi[j], h[-1])
    if lo < hi:
        ax.axvspan(lo, hi, color="tab:blue", alpha=0.12, label="linear range")
    twin = ax.twinx()
    centers = 0.5 * (edges[1:-2] + edges[2:-1])
    widths = np.diff(edges[1:-1])
    keep = (centers > h[0]) & (centers < h[-1])
    twin.bar(centers[keep], counts[1:-1][keep] / np.maximum(widths[keep], 1e-12), width=widths[keep],
             color="gray", alpha=0.25)
    twin.set_yticks([])
    ax.set_title(f"{title}: {lines.coverage[j]:.0%} in range", fontsize=8)
    ax.tick_params(labelsize=7)


def paths(stem: Path) -> list[Path]:
    """The files :func:`write` writes for ``stem`` (checked as destinations before any work)."""
    return [Path(f"{stem}.gelu.png"), Path(f"{stem}.layers.png")]


def _save(fig, path: Path) -> None:
    with modelio.staged_file(path) as tmp:
        fig.savefig(tmp, dpi=110)


def write(stem: Path, stats: dict[str, NeuronStats], lines: dict[str, Lines], measured: dict[str, dict]) -> list[Path]:
    """Write the report's plots next to ``stem``, each atomically; return the files written (none without
    matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return []
    names = list(lines)[:SAMPLE_BLOCKS]
    fig, axes = plt.subplots(len(names), 2, figsize=(8, 2.4 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        for ax, j in zip(row, (_samples(lines[name]) * 2)[:2]):
            _gelu_panel(ax, stats[name], lines[name], j, f"{name} neuron {j}")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    gelu_png, layers_png = paths(stem)
    _save(fig, gelu_png)
    plt.close(fig)

    blocks = list(lines)
    x = np.arange(len(blocks))
    calibrated = [1.0 - float(np.mean(lines[b].coverage)) for b in blocks]
    flagged = [measured.get(b, {}).get("flagged_share", np.nan) for b in blocks]
    error = [measured.get(b, {}).get("relative_error", np.nan) for b in blocks]
    fig, ax = plt.subplots(figsize=(max(6.5, 0.6 * len(blocks) + 2), 3.2))
    ax.bar(x - 0.2, calibrated, 0.4, label="calibrated out-of-range share")
    ax.bar(x + 0.2, flagged, 0.4, label="measured flagged share")
    ax.set_xticks(x, blocks, fontsize=7, rotation=45 if len(blocks) > 8 else 0)
    ax.set_ylabel("share of token-neuron pairs", fontsize=8)
    twin = ax.twinx()
    twin.plot(x, error, color="black", marker="o", label="relative error (measured)")
    twin.set_ylabel("relative block error", fontsize=8)
    if np.isfinite(error).any():
        twin.set_ylim(0, 1.2 * np.nanmax(error))
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    fig.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="lower center", ncol=3)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    _save(fig, layers_png)
    plt.close(fig)
    return [gelu_png, layers_png]
