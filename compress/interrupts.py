"""Stop signals during a run: finish the batch, keep a resumable state, exit non-zero with one line.

Lightning turns SIGTERM into a clean stop after the current batch and then exits with status 0
(``SIGTERMException`` is a ``SystemExit``), and turns Ctrl-C into ``sys.exit(1)``; a batch scheduler
would read the first as success. While ``fit`` runs, ``StopSignals`` handles SIGTERM and SIGINT: during
training the first signal asks Lightning to stop after the batch (a checkpoint is saved, see
``checkpoints.SaveOnInterrupt``), a second one stops at once; outside training it stops at once. Either
way ``Interrupted`` reaches the CLI, which prints how to resume and exits with 128 + the signal number.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator, Optional


class Interrupted(BaseException):
    """A run stopped by a signal (a ``BaseException``, so ``except Exception`` blocks let it through)."""

    def __init__(self, signum: int, run_dir=None):
        super().__init__(signum)
        self.signum = signum
        self.run_dir = run_dir

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class StopSignals:
    def __init__(self):
        self.signum: Optional[int] = None
        self.trainer = None

    def _handle(self, signum, frame) -> None:
        first = self.signum is None
        self.signum = signum
        if self.trainer is not None and first:
            connector = getattr(self.trainer, "_signal_connector", None)
            if connector is not None:  # Lightning stops after this batch and raises SIGTERMException
                if self.trainer.world_size == 1:
                    connector.received_sigterm = True
                # else: several ranks must stop after the same batch, or the checkpoint's collectives (and
                # DeepSpeed's) deadlock: ``SyncStop`` shares the request at the end of every batch
                print(f"\n[compress] {signal.Signals(signum).name}: stopping after this batch and saving a checkpoint "
                      "(send it again to stop at once)", file=sys.stderr, flush=True)
                return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopSignals"]:
        """Handle SIGTERM/SIGINT for the duration (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    @contextlib.contextmanager
    def training(self, trainer) -> Iterator[None]:
        """Around ``trainer.fit``: Lightning's exits on a stop become ``Interrupted``."""
        self.trainer = trainer
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None:
            # Lightning's own SIGTERM handler broadcasts over the process group from inside the handler, which
            # deadlocks when the signal lands during a collective (DeepSpeed's run all the time); ``_handle``
            # only sets the flag, and Lightning's training loop shares rank 0's flag at the next batch.
            connector._sigterm_notifier_fn = lambda signum, frame: None
        try:
            yield
        except SystemExit:
            raise Interrupted(self.signum or signal.SIGINT) from None
        except KeyboardInterrupt:
            raise Interrupted(self.signum or signal.SIGINT) from None
        finally:
            self.trainer = None


def sync_stop_callback(signals: StopSignals):
    """A Lightning callback that, with several ranks, stops all of them after the same batch when any one got a
    stop signal (an all-reduce of the signal number per batch), so they save the checkpoint together."""
    import torch
    import torch.distributed as dist
    from lightning.pytorch.callbacks import Callback

    class SyncStop(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
                return
            flag = torch.tensor([signals.signum or 0], dtype=torch.int32)
            if dist.get_backend() == "nccl":
                flag = flag.to(trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if int(flag.item()):
                signals.signum = signals.signum or int(flag.item())
                trainer._signal_connector.received_sigterm = True

    return SyncStop()
