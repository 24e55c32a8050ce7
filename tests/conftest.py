"""Test-wide settings (never touch the network) and the shared tiny synthetic dataset."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import signal

import pytest

# A few hundred samples: enough for every code path of a real run, fast on 2 CPU cores.
TINY_DATASET = dict(
    train_size=400,
    shard_size=100,
    eval_size=40,
    image_size=32,
    zeroshot_per_class=4,
    train_json_size=400,
    text_hidden=32,
    text_layers=1,
    text_heads=2,
)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Root of a tiny synthetic dataset in the real on-disk formats (generated once per session)."""
    from data.synthetic import ensure_synthetic_dataset

    return ensure_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic", seed=0, **TINY_DATASET)


@pytest.fixture(autouse=True)
def _restore_stop_signal_handlers():
    """Tests that build a Trainer in this process install its stop handlers; the next tests (and
    the processes they fork, such as the synthetic generator's pool) get the original ones."""
    signals = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    saved = {s: signal.getsignal(s) for s in signals}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
