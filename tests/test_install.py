"""The installed environment itself is healthy: the stack imports without ``import compress`` first.

The install puts ``compress-vision-torchvision-guard.pth`` in site-packages; it arms ``_compress_guard``
at interpreter start, so timm, Lightning and torchmetrics import in a fresh interpreter on a CPU torch
with the registry's CUDA-only torchvision. A broken or missing install fails these.
"""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path



def fresh_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_the_install_ships_the_guard_pth():
    assert (Path(sysconfig.get_paths()["purelib"]) / "compress-vision-torchvision-guard.pth").is_file()


def test_stack_imports_without_compress(tmp_path):
    code = ("import sys, timm, lightning.pytorch, torchmetrics, torchvision.transforms.v2\n"
            "assert 'compress' not in sys.modules\n"
            "timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8, depth=1)")
    proc = fresh_python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_start_up_stays_cheap(tmp_path):
    """The .pth arms a hook; it must not import torch into every interpreter."""
    proc = fresh_python("import sys; assert 'torch' not in sys.modules, 'torch imported at start-up'", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
