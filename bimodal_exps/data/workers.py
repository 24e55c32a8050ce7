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

import torch.utils.data
import tqdm

# tqdm starts a monitor thread with each first progress bar (and ends it when the last closes).
# A fork while another thread is being created can leave the child (a loader worker) blocked
# for ever on CPython's thread-state lock (seen with Python 3.11 under load: the evaluation
# loader's worker never started and the job hung). Without the monitor, bars still update;
# only its adjustment of very slow bars' refresh interval is lost.
tqdm.tqdm.monitor_interval = 0

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
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
