"""Pruners. Every module in this package is imported by the registry, so a new pruner is one file."""
from compress.pruners.base import Pruner, build_pruner

__all__ = ["Pruner", "build_pruner"]
