"""Lightning checkpoints a run can trust: written atomically, read as weights only, saved on interrupt.

``AtomicCheckpointIO`` is the Trainer's checkpoint plugin: ``last.ckpt`` is written to a temporary file
and renamed (Lightning's own writer truncates the old file first), and read back with
``weights_only=True`` said explicitly, so a pickle payload never runs whatever torch's default becomes.
``SaveOnInterrupt`` writes ``last.ckpt`` when a stop signal ended training after a batch, so
``--resume`` continues from that step instead of the last periodic checkpoint.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from compress import files
from compress.errors import CompressError

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        files.write_with(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path, map_location=None, weights_only: Optional[bool] = None) -> Dict[str, Any]:
        return read_checkpoint(Path(path), map_location)


def read_checkpoint(path: Path, map_location=None) -> Dict[str, Any]:
    """A Lightning checkpoint as plain tensors and values; a damaged or pickled-object file is named."""
    try:
        obj = torch.load(str(path), map_location=map_location or "cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "global" in str(e):  # a pickle that names Python objects torch will not build
            raise CompressError(f"--resume: {path} holds Python objects, not weights (refused: loading it could run "
                                "code); delete it to restart that stage from its beginning") from None
        raise CompressError(f"--resume: {path} is damaged (not a checkpoint torch can read); delete it to restart "
                            "that stage from its beginning") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, bad magic, ... are the same damaged file
        raise CompressError(f"--resume: {path} is damaged ({type(e).__name__}); delete it to restart that stage "
                            "from its beginning") from None
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise CompressError(f"--resume: {path} is not a Lightning checkpoint; delete it to restart that stage")
    return obj


class SaveOnInterrupt(Callback):
    """On a graceful stop (SIGTERM, or Ctrl-C turned into one), save ``last.ckpt`` of the step reached."""

    def __init__(self, dirpath: Path):
        self.path = Path(dirpath) / LAST

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(str(self.path))
