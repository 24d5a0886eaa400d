"""Model families: one file per family that declares what pruners need to know about its models (where the
blocks are, the token geometry, the cost model), the ToMe/tomesd pattern. Pruners ask ``family_of(model)``
instead of re-deriving the model; a new family is one file here (or a plugin) with ``@register_family``."""
from compress.families.base import Family, family_of  # noqa: F401
