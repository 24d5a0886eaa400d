"""Unstructured weight pruners: the shared base (masks kept through training, compact export) and the
storage report. Unstructured zeros shrink the export, not the time of dense kernels."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from compress.pruners.base import Pruner, StageRun
from compress.pruners.weight import masks as M

SPEED_NOTE = ("note: unstructured sparsity shrinks the stored model, not dense-kernel time (images/s stays dense); "
              "2:4 patterns (n_m: [2, 4]) can run on sparse tensor cores via compress.pruners.weight.masks.to_semi_structured")


class WeightPruner(Pruner):
    """Base of unstructured weight pruners: masks over nn.Linear/nn.Conv2d weights, hard zeros re-applied after
    every optimizer step, exported as nonzero values + bit masks."""

    kind = "weight"
    Config = M.WeightPrunerConfig

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self.layers: Dict[str, nn.Module] = {}
        self.masks: M.Masks = {}
        self.step = 0  # optimizer steps seen while attached, over all stages

    # -- lifecycle ------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        cfg = self.config
        self.layers = M.prunable_layers(model, cfg.include, cfg.exclude)
        if cfg.n_m is not None:
            for name, layer in self.layers.items():
                M.n_m_mask(layer.weight[:1], cfg.n_m[0], cfg.n_m[1], name)  # shape check only, fails early
        self.masks = {}

    def detach(self, model: nn.Module) -> None:
        """Stop masking; weights already zeroed stay zero."""
        self.layers, self.masks = {}, {}

    def bind(self, model: nn.Module) -> None:
        """Re-resolve the layers by name (the model the trainer runs may be a copy, e.g. after ddp_spawn)."""
        modules = dict(model.named_modules())
        self.layers = {n: modules[n] for n in self.layers}

    def decisions(self) -> Dict[str, Any]:
        import hashlib

        h = hashlib.sha256()
        for name in sorted(self.masks):
            h.update(name.encode())
            h.update(M.pack_bits(self.masks[name].cpu()).numpy().tobytes())
        return {"step": self.step, "masks": h.hexdigest()[:16], "layers": len(self.masks)}

    def rejoin(self, model: nn.Module) -> None:
        self.bind(model)

    # -- decisions --------------------------------------------------------------------------------
    def select(self, sparsity: float) -> M.Masks:
        """Per-layer magnitude masks at ``sparsity`` (or N:M), decided on rank 0 and broadcast."""
        cfg = self.config
        return M.decide(M.layer_masks, self.layers, sparsity, cfg.n_m, cfg.cap)

    def enforce(self) -> None:
        M.apply_masks(self.layers, self.masks)

    def stage_start(self, run: StageRun) -> None:
        """Bind to the model that trains (a copy under ddp_spawn/DeepSpeed), then ``on_stage_start``."""
        self.bind(run.model)
        self.on_stage_start(run.stage)

    def stage_end(self, run: StageRun) -> None:
        self.on_stage_end(run.stage)

    def on_stage_start(self, stage) -> None:
        """Hook with the recipe stage (``StageConfig``): every rank takes rank 0's masks, re-applied."""
        if self.masks:
            self.masks = M.broadcast_masks(self.masks)
            self.enforce()

    def on_stage_end(self, stage) -> None:
        pass

    def after_optimizer_step(self, run: Optional[StageRun] = None) -> None:
        self.step += 1
        self.enforce()

    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))

    # -- export -------------------------------------------------------------------------------------
    def make_final(self) -> None:
        """Hook: turn a pending decision into hard zeros before export."""

    def finalize(self, model: nn.Module) -> Dict[str, Any]:
        self.make_final()
        layers = M.prunable_layers(model, self.config.include, self.config.exclude)
        packed = {f"{n}.weight": list(m.weight.shape) for n, m in layers.items()
                  if M.packed_bytes(m.weight) < m.weight.numel() * m.weight.element_size()}
        total = sum(m.weight.numel() for m in layers.values())
        nonzero = sum(int(torch.count_nonzero(m.weight)) for m in layers.values())
        return {"packed": packed, "prunable_weights": total, "nonzero_weights": nonzero,
                "sparsity": round(1 - nonzero / total, 6)}

    @classmethod
    def apply_edits(cls, model: nn.Module, edits: Dict[str, Any]) -> None:
        """Nothing to rebuild: the architecture is unchanged, the zeros live in the weights."""

    @classmethod
    def pack_state(cls, state: Dict[str, torch.Tensor], edits: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        return M.pack_tensors(state, (edits or {}).get("packed", {}))

    @classmethod
    def unpack_state(cls, state: Dict[str, torch.Tensor], edits: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        return M.unpack_tensors(state, (edits or {}).get("packed", {}))

    @classmethod
    def figures(cls, m) -> Dict[str, Dict[str, Any]]:
        """Unstructured zeros are no speed: the nonzero parameters and the export's real file size instead."""
        storage = storage_report(m.dense, m.pruned, m.export)
        return {"storage": {**storage, "text": storage_lines(storage)}}


def dense_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def storage_report(dense: nn.Module, pruned: nn.Module, export_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Nonzero parameters of both models and, given an export, its real file size next to the dense weights."""
    from compress.measure import count_nonzero_params, count_params

    out = {"dense_nonzero_params": count_nonzero_params(dense), "pruned_nonzero_params": count_nonzero_params(pruned),
           "params": count_params(pruned), "dense_mb": dense_bytes(dense) / 2**20}
    if export_dir is not None and (Path(export_dir) / "model.safetensors").is_file():
        out["export_mb"] = (Path(export_dir) / "model.safetensors").stat().st_size / 2**20
    return out


def storage_lines(r: Dict[str, Any]) -> str:
    """Two lines for the bench / run tables."""
    line = (f"nonzero params: dense {r['dense_nonzero_params'] / 1e6:.3f}M, pruned {r['pruned_nonzero_params'] / 1e6:.3f}M "
            f"({1 - r['pruned_nonzero_params'] / r['params']:.1%} zeros)")
    if "export_mb" in r:
        line += f"; model.safetensors {r['export_mb']:.2f} MiB vs dense {r['dense_mb']:.2f} MiB"
    return line + "\n" + SPEED_NOTE
