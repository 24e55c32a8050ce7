"""Stop requests: SIGTERM, SIGUSR1 (a Slurm time limit or preemption) and SIGINT (Ctrl-C) ask
training to checkpoint and stop; a second Ctrl-C aborts at once."""

from __future__ import annotations

import signal
import time

from data.workers import STOP_SIGNALS

# Signals within this many seconds of the first are the same request arriving twice: a signal
# to a process group reaches a launcher (torchrun, bash run.slurm) that passes it on as well.
SAME_REQUEST_S = 1.0


class StopRequest:
    """Remembers that a stop signal arrived; the training loop polls ``requested`` between steps.

    A SIGINT more than ``SAME_REQUEST_S`` after the first stop signal raises KeyboardInterrupt:
    a second Ctrl-C aborts without waiting for the checkpoint. Loader workers ignore all three
    signals (``data.workers``), so a signal to the whole process group stops nothing but this.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._first_at = 0.0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def close(self) -> None:
        """Put back the handlers found at construction: a caller that runs training in its own
        process (tests, notebooks) gets its signal behaviour back, and processes it forks later
        (a multiprocessing pool's workers) die of SIGTERM again instead of ignoring it."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        # only a flag here: the loop logs and acts between steps, outside the handler
        now = time.monotonic()
        if self.signal_name is None:
            self.signal_name, self._first_at = signal.Signals(signum).name, now
        elif signum == signal.SIGINT and now - self._first_at > SAME_REQUEST_S:
            raise KeyboardInterrupt("a second Ctrl-C: aborted without a checkpoint")

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
