"""The trade-off a run bought, as one PNG: quality vs GMACs and quality vs images/s, dense beside pruned.

A table says the numbers; the picture shows at a glance what was paid (the quality drop) for what was
gained (compute, speed). Drawn with matplotlib's Agg canvas directly, not pyplot, so calling it from a
library or a notebook neither needs a display nor changes the caller's backend or open figures.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from compress import files

DENSE_COLOUR, PRUNED_COLOUR = "#4c72b0", "#dd8452"


def tradeoff_png(metrics: Dict[str, Any], path: Union[str, Path], title: Optional[str] = None,
                 metric: Optional[str] = None, metric_label: Optional[str] = None) -> Optional[Path]:
    """Write the dense-vs-pruned trade-off of ``metrics`` to ``path`` (PNG, written atomically); returns the path,
    or None (nothing written) when there is nothing to plot.

    ``metrics`` is the dict ``compress.report.finish`` builds and a run's ``metrics.json`` /
    ``export/compress.json["metrics"]`` hold: ``dense`` and ``pruned`` map metric names to values, and
    ``bench`` holds ``dense`` / ``pruned`` ``gmacs`` and ``speed[<batch size>]["images_per_s"]`` (the first
    batch size is plotted). ``metric`` is the quality metric for the y axis, e.g. ``Task.primary`` ("top1",
    "mIoU", "fid"); by default the first float both sides have. ``metric_label`` titles the axis (default: the
    metric's name). None is returned when there is no bench, no quality metric on both sides, or no GMACs.
    """
    quality = _quality(metrics, metric)
    bench = metrics.get("bench") or {}
    gmacs = _pair(bench, lambda side: side.get("gmacs"))
    if quality is None or gmacs is None:
        return None
    speed = _pair(bench, _images_per_s)
    name, (q_dense, q_pruned) = quality
    label = metric_label or name
    delta = q_pruned - q_dense

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("GMACs per image", gmacs, f"{gmacs[1] / gmacs[0]:.2f}x GMACs")]
    if speed is not None:
        bs = _first_batch_size(bench)
        panels.append((f"images/s (batch {bs})", speed, f"{speed[1] / speed[0]:.2f}x images/s"))
    fig = Figure(figsize=(4.2 * len(panels), 3.8), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    for i, (xlabel, (x_dense, x_pruned), ratio) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.annotate("", xy=(x_pruned, q_pruned), xytext=(x_dense, q_dense),
                    arrowprops={"arrowstyle": "->", "color": "0.6", "shrinkA": 6, "shrinkB": 6})
        ax.scatter([x_dense], [q_dense], s=60, color=DENSE_COLOUR, zorder=3)
        ax.scatter([x_pruned], [q_pruned], s=60, color=PRUNED_COLOUR, zorder=3)
        up = 1 if q_pruned < q_dense else -1  # each label on the side away from the other point
        for text, x, y, side, colour in ((f"dense\n{q_dense:.2f}", x_dense, q_dense, up, DENSE_COLOUR),
                                         (f"pruned\n{q_pruned:.2f} ({delta:+.2f})\n{ratio}", x_pruned, q_pruned, -up, PRUNED_COLOUR)):
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(0, 9 * side), ha="center",
                        va="bottom" if side > 0 else "top", fontsize=8, color=colour)
        ax.set_xlim(0, 1.25 * max(x_dense, x_pruned))  # from zero, so the distance shows the ratio
        ax.set_ylim(*_quality_range(q_dense, q_pruned))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")  # the temporary name has no .png suffix to infer it from
    return path


def _quality(metrics: Dict[str, Any], metric: Optional[str]) -> Optional[Tuple[str, Tuple[float, float]]]:
    """(name, (dense, pruned)) of the quality metric, or None when the two sides do not both have it."""
    dense, pruned = metrics.get("dense") or {}, metrics.get("pruned") or {}
    names = [metric] if metric else [k for k, v in dense.items() if isinstance(v, float)]  # counts (images) are ints
    for name in names:
        pair = (dense.get(name), pruned.get(name))
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair):
            return name, (float(pair[0]), float(pair[1]))
    return None


def _quality_range(a: float, b: float) -> Tuple[float, float]:
    """y limits around the two values, at least 2 % of their size wide on each side: a 0.3-point change
    should look small, not fill the axis, and the labels need room above and below."""
    pad = 1.5 * max(abs(a - b), 0.02 * max(abs(a), abs(b)), 1e-6)
    return min(a, b) - pad, max(a, b) + pad


def _pair(bench: Dict[str, Any], read) -> Optional[Tuple[float, float]]:
    """(dense, pruned) of one bench quantity, or None when either side lacks it or it is not positive."""
    values = [read(bench.get(side) or {}) for side in ("dense", "pruned")]
    if all(isinstance(v, (int, float)) and v > 0 for v in values):
        return float(values[0]), float(values[1])
    return None


def _first_batch_size(bench: Dict[str, Any]) -> str:
    return str(next(iter((bench.get("dense") or {}).get("speed") or {}), "?"))


def _images_per_s(side: Dict[str, Any]) -> Optional[float]:
    speed = next(iter((side.get("speed") or {}).values()), None)
    return None if speed is None else speed.get("images_per_s")
