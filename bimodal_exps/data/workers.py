"""Loader worker processes that leave stop signals to the main process.

Slurm signals every process of a job step, and Ctrl-C or ``kill -- -PGID`` a whole process
group, so loader workers receive the training's stop signals too. torch's workers die of a
SIGTERM (or a KeyboardInterrupt) that does not come from their parent, and the main process
then fails with "DataLoader worker exited unexpectedly" before it can checkpoint. Workers made
by :class:`DataLoader` ignore the stop signals: they keep serving batches until the main
process, which checkpoints and stops, shuts them down.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from multiprocessing import forkserver, resource_tracker

import torch.distributed
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
# Native threads can take that lock too, and nothing here can wait for them: gloo's worker
# threads ("pt_gloo_runloop") take the GIL, creating a thread state, when they release the last
# reference to a collective's tensors (seen: an evaluation worker of rank 1 blocked in
# PyOS_AfterFork_Child while a gloo thread held a thread state, under the real Slurm harness,
# about once in five runs). CPython fixed the child's lock in 3.12.0, 3.11.10 and 3.10.15
# (gh-112275); before those, workers are forked by multiprocessing's fork server, a
# single-threaded process started once, instead of by the multi-threaded training process, while
# a process group (and so gloo's or NCCL's threads) exists. A worker forked that way starts in
# about 3.5 s instead of 0.2 s (it re-imports the main module), so single-process runs, which
# have no such threads, still fork.
FORK_IS_SAFE = sys.version_info >= (3, 12) or (sys.version_info[:2] == (3, 11) and sys.version_info >= (3, 11, 10))
FORK_IS_SAFE = FORK_IS_SAFE or (sys.version_info[:2] == (3, 10) and sys.version_info >= (3, 10, 15))

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
    workers are up. The fork server (see FORK_IS_SAFE) is started under the same mask, keeps it,
    and so neither it nor the workers it forks die of a signal sent to the whole job.
    """

    def __init__(self, *args, **kwargs) -> None:
        if "worker_init_fn" in kwargs:
            raise ValueError("data.workers.DataLoader sets worker_init_fn itself")
        if not FORK_IS_SAFE and kwargs.get("num_workers", 0) > 0 and torch.distributed.is_initialized():
            kwargs.setdefault("multiprocessing_context", _fork_server())
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


def _fork_server() -> multiprocessing.context.BaseContext:
    """multiprocessing's fork-server context, its server started now with the stop signals
    blocked (which it and the workers it forks keep until ``_worker_init``). The server imports
    the training's main module and torch once, so that a worker forked from it starts in
    milliseconds."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", "torch", "data.loaders", "data.retrieval_split"])
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        # the resource tracker, which the server needs, unblocks SIGINT and SIGTERM after it starts
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return context
