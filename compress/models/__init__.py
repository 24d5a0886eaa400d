"""Model builders. Any timm model name works; modules here register extra named builders."""
from compress.models.build import build_model, load_weights, model_spec

__all__ = ["build_model", "load_weights", "model_spec"]
