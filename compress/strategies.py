"""Lightning strategy from the recipe.

Names pass through to Lightning, except DeepSpeed's: ``deepspeed``, ``deepspeed_stage_{1,2,3}`` (and the
offload variants) become a ``DeepSpeedStrategy`` built here, and ``{deepspeed: {...}}`` takes either
DeepSpeed's own config keys (``zero_optimization``, ``bf16``, ...) or ``DeepSpeedStrategy`` arguments
(``stage``, ``offload_optimizer``, ...). On a CPU accelerator the strategy is ``CPUDeepSpeedStrategy``:
Lightning's refuses anything but CUDA, while DeepSpeed itself runs ZeRO on CPU over gloo, which is what
tests and laptops need. DeepSpeed is imported only when a recipe asks for it.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Dict, Optional, Union

from compress.errors import CompressError

# Top-level keys of a DeepSpeed config (https://www.deepspeed.ai/docs/config-json/) a recipe may give.
DS_CONFIG_KEYS = {
    "zero_optimization", "bf16", "fp16", "amp", "gradient_clipping", "train_batch_size",
    "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "activation_checkpointing", "wall_clock_breakdown",
    "steps_per_print", "prescale_gradients", "gradient_predivide_factor", "communication_data_type",
    "sparse_gradients", "data_types", "flops_profiler", "comms_logger", "checkpoint", "aio", "compile",
    "seq_parallel_communication_data_type", "memory_breakdown", "dump_state",
}


def is_deepspeed(strategy: Union[str, Dict[str, Any], None]) -> bool:
    """Whether a recipe's ``trainer.strategy`` asks for DeepSpeed."""
    if isinstance(strategy, dict):
        return set(strategy) == {"deepspeed"}
    return isinstance(strategy, str) and strategy.startswith("deepspeed")


def zero_stage(strategy: Union[str, Dict[str, Any], None]) -> Optional[int]:
    """The ZeRO stage a recipe's strategy setting asks for (None when it is not DeepSpeed)."""
    if not is_deepspeed(strategy):
        return None
    if isinstance(strategy, str):
        from lightning.pytorch.strategies import StrategyRegistry

        params = StrategyRegistry[strategy]["init_params"] if strategy in StrategyRegistry else {}
        return int(params.get("stage", 2))
    cfg = strategy["deepspeed"] if isinstance(strategy["deepspeed"], dict) else {}
    if "zero_optimization" in cfg:
        zo = cfg["zero_optimization"]
        return int(zo.get("stage", 0)) if isinstance(zo, dict) else 0
    return int(cfg.get("stage", 2))


def _cpu(accelerator: str) -> bool:
    if accelerator == "cpu":
        return True
    if accelerator == "auto":
        import torch

        return not torch.cuda.is_available()
    return False


def resolve_strategy(strategy: Union[str, Dict[str, Any]], accelerator: str = "auto"):
    """What ``Trainer(strategy=...)`` gets for the recipe's ``trainer.strategy`` and ``trainer.accelerator``."""
    if isinstance(strategy, str):
        if not is_deepspeed(strategy):
            return strategy
        _require_deepspeed(strategy)
        from lightning.pytorch.strategies import StrategyRegistry

        if strategy not in StrategyRegistry:
            raise CompressError(f"trainer.strategy: {strategy!r} is not a DeepSpeed strategy Lightning knows "
                                f"({', '.join(s for s in StrategyRegistry.available_strategies() if s.startswith('deepspeed'))})")
        return deepspeed_strategy_class(_cpu(accelerator))(**StrategyRegistry[strategy]["init_params"])
    if set(strategy) != {"deepspeed"} or not isinstance(strategy["deepspeed"], dict):
        raise CompressError("trainer.strategy: a mapping must be {deepspeed: {<DeepSpeed config or DeepSpeedStrategy "
                            "arguments>}}")
    _require_deepspeed("deepspeed")
    cls = deepspeed_strategy_class(_cpu(accelerator))
    given = strategy["deepspeed"]
    args = set(inspect.signature(cls.__init__).parameters) - {"self", "config"}
    config_keys = [k for k in given if k in DS_CONFIG_KEYS]
    unknown = [k for k in given if k not in DS_CONFIG_KEYS and k not in args]
    if unknown:
        raise CompressError(f"trainer.strategy.deepspeed.{unknown[0]}: neither a DeepSpeed config key nor a "
                            "DeepSpeedStrategy argument")
    if config_keys and len(config_keys) < len(given):
        other = next(k for k in given if k not in DS_CONFIG_KEYS)
        raise CompressError(f"trainer.strategy.deepspeed.{other}: give DeepSpeed config keys "
                            f"({', '.join(config_keys)}) or DeepSpeedStrategy arguments, not both")
    try:
        # a torch optimizer from configure_optimizers is 'untested' for DeepSpeed's ZeRO unless allowed
        return cls(config={"zero_allow_untested_optimizer": True, **given}) if config_keys else cls(**given)
    except (TypeError, ValueError) as e:
        raise CompressError(f"trainer.strategy.deepspeed: {e}") from None


@functools.lru_cache(maxsize=None)
def atomic_deepspeed_class() -> type:
    """Lightning's ``DeepSpeedStrategy`` with atomic checkpoint folders (built once, on first use)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    class AtomicDeepSpeedStrategy(DeepSpeedStrategy):
        """Lightning's DeepSpeed strategy whose checkpoint folders (``last.ckpt/``, one shard per rank) are
        written beside their place and renamed into it by rank 0 once every rank has written its shard: an
        interruption mid-save leaves the previous complete checkpoint (assumes the ranks share a filesystem,
        as DeepSpeed's own loading of sharded checkpoints does)."""

        def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
            import shutil
            from pathlib import Path

            from compress import files

            final = Path(self.broadcast(str(filepath)))
            tmp = final.parent / f"{files.TMP_PREFIX}{final.name}"
            if self.is_global_zero:
                final.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
            self.barrier("compress_ckpt_start")
            super().save_checkpoint(checkpoint, str(tmp), storage_options)
            self.barrier("compress_ckpt_written")
            if self.is_global_zero:
                files.replace_dir(tmp, final)
            self.barrier("compress_ckpt_renamed")

    return AtomicDeepSpeedStrategy


@functools.lru_cache(maxsize=None)
def deepspeed_strategy_class(cpu: bool) -> type:
    """Lightning's ``DeepSpeedStrategy`` on GPUs; on CPU the subclass below (built once, on first use)."""
    AtomicDeepSpeedStrategy = atomic_deepspeed_class()
    if not cpu:
        return AtomicDeepSpeedStrategy

    import argparse

    from lightning.pytorch.strategies.ddp import DDPStrategy

    class CPUDeepSpeedStrategy(AtomicDeepSpeedStrategy):
        """Lightning's DeepSpeed strategy on a CPU accelerator (gloo). It skips the CUDA-only check and the
        CUDA device-index validation, and hands ``deepspeed.initialize`` the local rank as device rank
        (Lightning passes the root device's index, which is None on CPU)."""

        strategy_name = "deepspeed_cpu"

        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's own only adds the CUDA check

        def setup_distributed(self) -> None:
            from lightning.fabric.utilities.seed import reset_seed

            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
            import deepspeed

            engine, ds_optimizer, _, _ = deepspeed.initialize(
                args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
                model_parameters=filter(lambda p: p.requires_grad, model.parameters()), optimizer=optimizer,
                lr_scheduler=lr_scheduler, dist_init_required=False)
            return engine, ds_optimizer

    return CPUDeepSpeedStrategy


def check_deepspeed(recipe) -> None:
    """What a DeepSpeed recipe cannot run, refused before anything is written: fp16 on CPU (DeepSpeed's CPU
    accelerator trains fp32, or bf16 with an fp32 master copy; fp16 with loss scaling is for GPUs), and pruners
    that say they cannot work on partitioned ZeRO-3 weights (``Pruner.zero3_problem``)."""
    t = recipe.trainer
    stage = zero_stage(t.strategy)
    if stage is None:
        return
    if _cpu(t.accelerator) and str(t.precision) not in ("32", "32-true", "bf16-mixed", "bf16"):
        raise CompressError(f"trainer.precision: {t.precision!r} under DeepSpeed needs CUDA GPUs; on CPU use 32-true "
                            "or bf16-mixed")
    if stage < 3:
        return
    from compress.registry import PRUNERS

    for i, s in enumerate(recipe.stages):
        if s.pruner is None:
            continue
        problem = PRUNERS.get(s.pruner.name).zero3_problem(s.pruner.config(f"stages[{i}].pruner"))
        if problem:
            raise CompressError(f"stages[{i}].pruner.{problem} (trainer.strategy is ZeRO-3: weights are partitioned; "
                                "use deepspeed_stage_2 or ddp)")


def _require_deepspeed(name: str) -> None:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise CompressError(f"trainer.strategy: {name!r} needs DeepSpeed: pip install 'compress-vision[deepspeed]' "
                            "(on CPU machines also a C++ compiler: DeepSpeed builds its communication op on first use)")
