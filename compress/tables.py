"""The markdown tables the report, ``compress bench`` and the Hub model card print (dense vs pruned)."""
from __future__ import annotations

from typing import Any, Dict


def table(rows: Dict[str, Dict[str, Any]], columns) -> str:
    """A markdown table: ``rows`` maps a row name to its values; ``columns`` are (key, title, fmt)."""
    head = "| | " + " | ".join(title for _, title, _ in columns) + " |"
    sep = "|---|" + "---|" * len(columns)
    lines = [head, sep]
    for name, vals in rows.items():
        cells = []
        for key, _, fmt in columns:
            v = vals.get(key)
            cells.append("–" if v is None else format(v, fmt))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(metrics: Dict[str, Any], columns) -> str:
    """Dense vs pruned: the task's quality ``columns`` (see ``Task.columns``), then GMACs, params, speed."""
    bench = metrics.get("bench") or {}
    rows = {}
    for name in ("dense", "pruned"):
        quality = metrics.get(name) or {}
        b = bench.get(name) or {}
        speed = next(iter(b.get("speed", {}).values()), {})
        rows[name] = {**{key: quality.get(key) for key, _, _ in columns}, "gmacs": b.get("gmacs"),
                      "params": b["params"] / 1e6 if "params" in b else None, "ips": speed.get("images_per_s")}
    if bench:
        r = bench["ratios"]
        rows["ratio"] = {"gmacs": r["gmacs"], "params": r["params"], "ips": next(iter(r["speedup"].values()))}
        if metrics.get("dense") and metrics.get("pruned"):
            for key, _, _ in columns:
                if key in metrics["pruned"] and key in metrics["dense"]:
                    rows["ratio"][key] = metrics["pruned"][key] - metrics["dense"][key]
    bs = next(iter(bench.get("dense", {}).get("speed", {})), "?")
    cols = [*columns, ("gmacs", "GMACs", ".4f"), ("params", "params (M)", ".3f"), ("ips", f"images/s (batch {bs})", ".1f")]
    return table(rows, cols) + "\n(ratio row: pruned/dense for GMACs, params, images/s; difference in points for the metrics)"
