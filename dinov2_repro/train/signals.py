"""Stop cleanly on Ctrl-C or ``kill``: SIGINT and SIGTERM let the current step finish, then the loop writes a
checkpoint and stops with `TrainingStopped`. A second signal stops at once (the default behaviour).

Ranks agree on the stop inside the step's one metric all-reduce (`step.STOP_KEY`), so every rank stops after
the same iteration even when the signal reached only some of them.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Dict, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(RuntimeError):
    """Training stopped on a signal after a checkpoint was written; the message says how to resume."""

    def __init__(self, signal_name: str, iteration: int, checkpoint: Optional[str]):
        self.signal_name, self.iteration, self.checkpoint = signal_name, iteration, checkpoint
        self.exit_code = 128 + int(getattr(signal, signal_name, signal.SIGTERM))
        super().__init__(f"stopped by {signal_name} after iteration {iteration}; checkpoint {checkpoint}; "
                         f"run the same command again to resume")


class StopSignals:
    """Context manager that records SIGINT/SIGTERM instead of dying mid-step (main thread only; elsewhere it
    installs nothing and never requests a stop)."""

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: Dict[int, Any] = {}

    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # the second signal: the user insists
            self._restore()
            signal.raise_signal(signum)
            return
        self.received = signal.Signals(signum).name

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()
