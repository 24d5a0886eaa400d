"""Shared fixtures. ``import compress`` must come first: it installs the torchvision guard that has
to run before anything imports timm, Lightning or torchmetrics."""
import compress  # noqa: F401  (first, on purpose)

import os

os.environ["HF_HUB_OFFLINE"] = "1"
# Tiny models gain nothing from intra-op threads, and on a shared or loaded CPU OpenMP's spinning
# threads make them tens of times slower: one thread here and in every child process (DDP tests).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
QUICKSTART = RECIPES / "quickstart.yaml"


def assets_root() -> Path:
    return Path(os.environ.get("COMPRESS_ASSETS", str(REPO.parent / "shared" / "assets")))


@pytest.fixture(scope="session")
def assets() -> Path:
    """Folder of real, pre-downloaded test assets (``COMPRESS_ASSETS`` or ``<repo>/../shared/assets``)."""
    return assets_root()


def need_asset(relpath: str) -> Path:
    """The asset ``relpath`` under the assets folder, or skip the test saying which one is missing."""
    path = assets_root() / relpath
    if not path.exists():
        pytest.skip(f"test asset missing: {path} (set COMPRESS_ASSETS to the folder holding it)")
    return path


@pytest.fixture
def require_asset():
    """``require_asset("deit_tiny/deit_tiny_patch16_224.pth")`` -> Path, or skip with the reason."""
    return need_asset


@pytest.fixture
def tiny_vit():
    """A tiny random-weight timm ViT: 32 px input, 8 px patches (16 patch tokens + CLS), 3 blocks, 10 classes."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                             num_classes=10).eval()


def only_run(out: Path) -> Path:
    """The one run directory ``compress fit --out OUT`` made (``OUT/<recipe name>/<stamp>``)."""
    runs = [p for p in out.glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]
