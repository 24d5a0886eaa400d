"""compress: prune vision transformers, Vision-Mamba and diffusion UNets while they train."""
from compress import _torchvision_guard

_torchvision_guard.install()  # must run before anything imports timm / lightning / torchmetrics

from compress.errors import CompressError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["CompressError", "load", "save", "__version__"]


def __getattr__(name):  # lazy, so `import compress` stays cheap for the CLI's --help
    if name in ("load", "save"):
        from compress import export

        return getattr(export, name)
    raise AttributeError(f"module 'compress' has no attribute {name!r}")
