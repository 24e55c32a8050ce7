"""Loader workers (data/workers.py): where they are forked from, and what they do with stop signals.

On CPython before 3.12.0 / 3.11.10 / 3.10.15 a fork from the multi-threaded training process
can hang the child (gh-112275), so the workers must come from multiprocessing's single-threaded
fork server; newer Pythons fork directly. Either way a worker ignores the stop signals.
"""

from __future__ import annotations

import os
import signal

import torch.utils.data

from data import workers


class WorkerFacts(torch.utils.data.Dataset):
    """Each item: (the worker's parent pid, whether SIGTERM, SIGUSR1 and SIGINT are ignored and unblocked)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple[int, bool]:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        ignored = all(signal.getsignal(s) == signal.SIG_IGN and s not in blocked for s in workers.STOP_SIGNALS)
        return os.getppid(), ignored


def test_workers_come_from_the_fork_server_where_fork_can_hang():
    loader = workers.DataLoader(WorkerFacts(), batch_size=None, num_workers=2)
    facts = list(loader)
    parents = {parent for parent, _ in facts}
    assert all(ignored for _, ignored in facts)
    if workers.FORK_IS_SAFE:
        assert parents == {os.getpid()}
    else:
        assert loader.multiprocessing_context.get_start_method() == "forkserver"
        assert len(parents) == 1 and os.getpid() not in parents  # the fork server, one for all loaders
    # the main process's own signal mask is as it was
    assert not set(workers.STOP_SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, [])
