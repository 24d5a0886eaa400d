"""Token pruners for timm ViTs (built on ``compress.tokens``)."""
