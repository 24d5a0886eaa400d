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
                connector.received_sigterm = True
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
        try:
            yield
        except SystemExit:
            raise Interrupted(self.signum or signal.SIGINT) from None
        except KeyboardInterrupt:
            raise Interrupted(self.signum or signal.SIGINT) from None
        finally:
            self.trainer = None
