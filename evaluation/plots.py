"""Plots of benchmark results, written as PNG (whole or not at all)."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

from .reporting import write_atomic


def plot_benchmark(stock_row: dict, rows: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Speedup (with the compute-bound ceiling) and quality (CLIP score, PSNR) per configuration, written to
    ``path`` whole or not at all."""
    return write_atomic(path, benchmark_plot_png(stock_row, rows, title))


def benchmark_plot_png(stock_row: dict, rows: list[dict], title: str = "") -> bytes:
    """The PNG bytes of :func:`plot_benchmark`'s figure (for writing together with other files)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: benchmarks run on servers
    import matplotlib.pyplot as plt

    labels = [r["config"].replace("AsyncDiff ", "").replace(" + CFG parallel", "+CFG") for r in rows]
    x = range(len(rows))
    fig, (speed, quality) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) + 4), 4.2))
    speed.bar(x, [r["speedup"] for r in rows], color="tab:blue", label="measured")
    speed.scatter(x, [r["compute_bound_speedup"] for r in rows], color="black", marker="_", s=400, zorder=3,
                  label="compute-bound ceiling")
    speed.axhline(1.0, color="grey", lw=0.8, ls="--")
    speed.set_ylabel("speedup over one device")
    speed.legend(loc="lower right", fontsize=8)
    if "clip_score" in stock_row:
        quality.plot(x, [r["clip_score"] for r in rows], "o", color="tab:green", ms=8, label="CLIP score")
        quality.axhline(stock_row["clip_score"], color="tab:green", lw=0.8, ls="--", label="CLIP score, one device")
        quality.set_ylabel("CLIP score")
        quality.legend(loc="lower left", fontsize=8)
    psnr_axis = quality.twinx()
    finite = [r["psnr_db"] for r in rows if math.isfinite(r["psnr_db"])]
    top = max(finite, default=40.0) + 10  # identical images (infinite PSNR) are drawn at the top, marked
    for i, r in enumerate(rows):
        value = r["psnr_db"] if math.isfinite(r["psnr_db"]) else top
        psnr_axis.plot(i, value, "s", color="tab:red", ms=7)
        if not math.isfinite(r["psnr_db"]):
            psnr_axis.annotate("identical", (i, value), textcoords="offset points", xytext=(0, 6), ha="center",
                               fontsize=7, color="tab:red")
    psnr_axis.set_ylim(0, top + 5)
    psnr_axis.set_ylabel("PSNR vs one device (dB), squares", color="tab:red")
    for axis in (speed, quality):
        axis.set_xticks(list(x), labels, rotation=20, ha="right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()
