"""A list that ``copy.deepcopy`` does not copy: frozen helpers (a teacher, text encoders, a VAE) and the run's pruners
stay shared between copies of a model or module (the dense reference, DeepSpeed's stage copy, an EMA copy), and
out of its module tree, state dict and strategies."""
from __future__ import annotations


class SharedList(list):
    def __deepcopy__(self, memo):
        return self
