"""Loader workers (data/workers.py): where they are forked from, and what they do with stop signals.

On CPython before 3.12.0 / 3.11.10 / 3.10.15 a fork from the multi-threaded training process
can hang the child (gh-112275), so the workers must come from multiprocessing's single-threaded
fork server; newer Pythons, and processes without a process group, fork directly. Either way
a worker ignores the stop signals.
"""

from __future__ import annotations

import os
import signal

import torch.distributed as dist
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


def facts_of_a_loader() -> tuple[set[int], torch.utils.data.DataLoader]:
    loader = workers.DataLoader(WorkerFacts(), batch_size=None, num_workers=2)
    facts = list(loader)
    assert all(ignored for _, ignored in facts)
    # the main process's own signal mask is as it was
    assert not set(workers.STOP_SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, [])
    return {parent for parent, _ in facts}, loader


def test_workers_come_from_the_fork_server_where_fork_can_hang(tmp_path):
    """Without a process group the workers are forked (no gloo threads); with one, on an
    affected Python, the fork server forks them."""
    parents, _ = facts_of_a_loader()
    assert parents == {os.getpid()}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        parents, loader = facts_of_a_loader()
    finally:
        dist.destroy_process_group()
    if workers.FORK_IS_SAFE:
        assert parents == {os.getpid()}
    else:
        assert loader.multiprocessing_context.get_start_method() == "forkserver"
        assert len(parents) == 1 and os.getpid() not in parents  # the fork server, one for all loaders
