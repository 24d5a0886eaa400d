"""Lightning strategy from the recipe: names pass through; ``{deepspeed: {...}}`` builds a
``DeepSpeedStrategy`` from a config dict. DeepSpeed is imported only when asked for."""
from __future__ import annotations

from typing import Any, Dict, Union

from compress.errors import CompressError


def resolve_strategy(strategy: Union[str, Dict[str, Any]]):
    if isinstance(strategy, str):
        if strategy.startswith("deepspeed"):
            _require_deepspeed(strategy)
        return strategy
    if set(strategy) != {"deepspeed"} or not isinstance(strategy["deepspeed"], dict):
        raise CompressError("trainer.strategy: a mapping must be {deepspeed: {<DeepSpeedStrategy arguments>}}")
    _require_deepspeed("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    try:
        return DeepSpeedStrategy(**strategy["deepspeed"])
    except TypeError as e:
        raise CompressError(f"trainer.strategy.deepspeed: {e}") from None


def _require_deepspeed(name: str) -> None:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise CompressError(f"trainer.strategy: {name!r} needs DeepSpeed: pip install 'compress-vision[deepspeed]'")
