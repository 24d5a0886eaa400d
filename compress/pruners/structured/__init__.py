"""Structured pruners: remove whole heads, MLP hidden units or channels, so the model gets physically smaller."""
