"""Datasets. Every module here registers its kind with ``@register_dataset``."""
