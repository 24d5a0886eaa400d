"""Per-expert figures of a routed (APTP) model: MACs, parameters, images/s and the prompts each expert got.

``compress bench`` on an APTP export times one expert at a time (``RoutedUNets.expert``) on the same
inputs as the dense UNet, and weights the experts' MACs by their share of the training prompts (the
average cost APTP's budget refers to).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Sequence

import torch.nn as nn

from compress import measure


def is_routed(model: nn.Module) -> bool:
    return hasattr(getattr(model, "unet", None), "experts")


def expert_report(model: nn.Module, example: Callable[[int], Any], batch_sizes: Sequence[int], device: str = "cpu",
                  repeats: int = 6, dense_gmacs: float = None, edits: Dict[str, Any] = None) -> Dict[str, Any]:
    routed = model.unet
    edits = edits or next((p.get("edits") for p in (getattr(model, "_compress_manifest", {}) or {}).get("pruners", [])
                  if p.get("spec", {}).get("name") == "aptp"), {}) or {}
    share = edits.get("prompts_per_expert") or [1] * len(routed.experts)
    rows = []
    try:
        for k, expert in enumerate(routed.experts):
            routed.expert = k
            row = {"expert": k, "gmacs": measure.count_gmacs(model.to(device), example(1)),
                   "params": measure.count_params(expert), "prompts": share[k] if k < len(share) else 0, "speed": {}}
            for bs in batch_sizes:
                row["speed"][str(bs)] = measure.throughput(model, example(bs), warmup=2, repeats=repeats)
            rows.append(row)
    finally:
        routed.expert = None
    total = sum(r["prompts"] for r in rows) or 1
    avg = sum(r["gmacs"] * r["prompts"] for r in rows) / total
    by_expert: Dict[int, list] = {}
    for prompt, k in (edits.get("assignment") or {}).items():
        by_expert.setdefault(int(k), []).append(prompt)
    out = {"experts": rows, "avg_gmacs": avg, "prompts_by_expert": {str(k): v[:20] for k, v in sorted(by_expert.items())}}
    if dense_gmacs:
        out["avg_gmacs_ratio"] = avg / dense_gmacs
    out["table"] = expert_table(out, dense_gmacs)
    return out


def expert_table(r: Dict[str, Any], dense_gmacs: float = None) -> str:
    bs = next(iter(r["experts"][0]["speed"])) if r["experts"] else "?"
    lines = [f"| expert | GMACs | {'ratio to dense | ' if dense_gmacs else ''}params (M) | images/s @{bs} | prompts | e.g. |",
             "|---|---|" + ("---|" if dense_gmacs else "") + "---|---|---|---|"]
    for row in r["experts"]:
        examples = "; ".join(r["prompts_by_expert"].get(str(row["expert"]), [])[:3])
        ratio = f"{row['gmacs'] / dense_gmacs:.3f} | " if dense_gmacs else ""
        lines.append(f"| {row['expert']} | {row['gmacs']:.4f} | {ratio}{row['params'] / 1e6:.3f} | "
                     f"{row['speed'][bs]['images_per_s']:.1f} | {row['prompts']} | {examples} |")
    lines.append(f"prompt-weighted average GMACs {r['avg_gmacs']:.4f}"
                 + (f" ({r['avg_gmacs'] / dense_gmacs:.3f} of dense)" if dense_gmacs else ""))
    return "\n".join(lines)
