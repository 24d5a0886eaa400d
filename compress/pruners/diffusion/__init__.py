"""Pruners for text-to-image diffusion UNets (APTP and its single-architecture baseline)."""
