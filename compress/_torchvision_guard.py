"""The torchvision guard (``_compress_guard``), also run from ``import compress`` for interpreters that
start without the install's ``.pth`` file (e.g. ``PYTHONNOUSERSITE`` tricks or ``python -S``)."""
from _compress_guard import install

__all__ = ["install"]
