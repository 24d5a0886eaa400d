"""A tiny ViT for the quick-start task (32 px, 4 px patches), built with timm's VisionTransformer."""
from __future__ import annotations

from compress.registry import register_model


@register_model("quickstart_vit")
def quickstart_vit(pretrained: bool = False, **kwargs):
    from timm.models.vision_transformer import VisionTransformer

    if pretrained:
        from compress.errors import CompressError

        raise CompressError("model.pretrained: quickstart_vit has no pretrained weights")
    args = dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3, mlp_ratio=3.0, num_classes=6)
    args.update(kwargs)
    model = VisionTransformer(**args)
    model.pretrained_cfg = {"input_size": (3, args["img_size"], args["img_size"]), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                            "interpolation": "bilinear", "crop_pct": 1.0, "num_classes": args["num_classes"]}
    return model
