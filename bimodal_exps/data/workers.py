"""Loader worker processes that leave stop signals to the main process.

Slurm signals every process of a job step, and Ctrl-C or ``kill -- -PGID`` a whole process
group, so loader workers receive the training's stop signals too. torch's workers die of a
SIGTERM (or a KeyboardInterrupt) that does not come from their parent, and the main process
then fails with "DataLoader worker exited unexpectedly" before it can checkpoint. Workers made
by :class:`DataLoader` ignore the stop signals: they keep serving batches until the main
process, which checkpoints and stops, shuts them down.
"""

from __future__ import annotations

import os
import signal
import threading

import torch.utils.data
import tqdm

# Python threads starting or ending while a worker is forked. CPython 3.11 takes no lock around
# fork, so a thread that is creating or deleting its thread state at that moment leaves the
# child blocked for ever on the interpreter's thread-state lock: the worker never starts and the
# job hangs (seen under load, in the evaluation loader forked right after the training loader
# shut down). Two sources are removed: tqdm's monitor thread, started with a first progress bar
# and ended with the last (without it bars still update; only its tuning of very slow bars'
# refresh is lost), and the feeder threads of a finished loader's queues, which exit after the
# loader has returned and are waited for before the next fork.
tqdm.tqdm.monitor_interval = 0
FEEDER_EXIT_TIMEOUT_S = 5.0

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# Workers run at a lower priority than the training process: where they share cores with its
# compute threads (CPU training) they fill the threads' idle moments instead of preempting one,
# which stalls the others at the next synchronisation; the prefetched batches absorb the delay.
WORKER_NICENESS = 10


def _worker_init(worker_id: int) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    os.nice(WORKER_NICENESS)


class DataLoader(torch.utils.data.DataLoader):
    """torch's DataLoader whose workers ignore SIGTERM, SIGUSR1 and SIGINT.

    The signals are blocked in the main thread while the workers are forked, so that none
    arrives in a worker before it ignores them; the main process receives them once the
    workers are up.
    """

    def __init__(self, *args, **kwargs) -> None:
        if "worker_init_fn" in kwargs:
            raise ValueError("data.workers.DataLoader sets worker_init_fn itself")
        super().__init__(*args, worker_init_fn=_worker_init, **kwargs)

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        _wait_for_feeder_threads()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _wait_for_feeder_threads() -> None:
    """Wait until the queue feeder threads of loaders that were shut down have exited (they end
    within milliseconds of their queue's close); a feeder still serving a live queue only costs
    the timeout."""
    for thread in threading.enumerate():
        if thread.name == "QueueFeederThread" and thread is not threading.current_thread():
            thread.join(FEEDER_EXIT_TIMEOUT_S)
