"""SIGTERM / SIGUSR1 (a Slurm time limit or preemption) ask training to checkpoint and stop."""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Remembers that a stop signal arrived; the training loop polls ``requested`` between steps.

    Install it before any DataLoader starts its workers: forked workers inherit the handler,
    so the signal (which Slurm sends to every process of a job step) does not kill them.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        # only a flag here: the loop logs and acts between steps, outside the handler
        self.signal_name = self.signal_name or signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
