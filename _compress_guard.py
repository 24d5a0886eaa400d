"""Make the registry's CUDA-only torchvision importable on a CPU torch, in every interpreter.

torchvision 0.28.0 on PyPI links ``libtorch_cuda.so``. On a CPU torch its ``_C`` extension fails to
load silently and torchvision then registers fake kernels for ``torchvision::nms``/``qnms``, which
raises because the ops were never defined; timm, Lightning and torchmetrics all import torchvision,
so every import of the stack fails. When (and only when) ``_C`` cannot be loaded we define the two op
schemas ourselves, so the pure-Python parts of torchvision (transforms, datasets) work. On a healthy
torchvision (CUDA torch, or a CPU build) this does nothing.

This is a top-level module so that the ``.pth`` file the install puts in site-packages can arm it at
interpreter start (``install_hook``) without importing torch or ``compress``: the guard runs only when
something first imports torchvision, so ``import timm`` works with or without ``import compress``.
"""
from __future__ import annotations

import glob
import importlib.abc
import importlib.util
import os
import sys

_LIBRARY = None  # keeps the torch.library registration alive for the interpreter's lifetime


def _extension_loads(package_dir: str) -> bool:
    import torch

    candidates = glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(os.path.join(package_dir, "_C*.pyd"))
    if not candidates:
        return False
    try:
        torch.ops.load_library(candidates[0])
    except (OSError, RuntimeError):
        return False
    return True


def install() -> bool:
    """Define the missing op schemas if torchvision's extension cannot load; return True if it did."""
    global _LIBRARY
    _disarm()  # find_spec below must not re-enter through the hook
    if _LIBRARY is not None or "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    if _extension_loads(list(spec.submodule_search_locations)[0]):
        return False
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY = lib
    return True


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs ``install`` once, just before the first ``import torchvision``, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            install()
        return None  # the normal finders import torchvision


def _disarm() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _BeforeTorchvision)]


def install_hook() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
