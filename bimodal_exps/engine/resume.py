"""What a checkpoint holds, which settings must match to resume or evaluate it, and how every
rank comes to load the same one.

Schema (``Trainer.state_dict``): ``model``, ``loss`` (the loss's buffers and parameters: per-sample
state), ``optimizer``, ``scheduler``, ``scaler`` (state dicts); ``progress`` (``epoch``: epochs
done, ``epoch_step``, ``step``, ``samples_seen``, ``skipped_steps``, ``amp_skipped_steps``);
``best`` (``r_mean``, ``epoch``); ``world_size``; ``per_rank`` (per rank: ``data_position``,
``rng``, ``bad_data``); ``config`` (the run's resolved settings). With owner-sharded loss state
also ``loss_shards`` (``world``, ``files``: the shard file of each rank, beside the checkpoint,
``{"step", "arrays": name -> [slots]}``), and ``loss`` lacks the per-sample arrays.

Rank 0 alone decides which checkpoint a run continues from (``--resume auto``: the newest of its
output folder) and every rank loads that file: on node-local or lagging storage another rank
could otherwise find another checkpoint, or none, and the replicas would silently diverge. When
a rank cannot read it, or reads another step, every rank stops with one message naming them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import parallel
from engine.checkpoint import CheckpointDir, load_checkpoint

log = logging.getLogger("clip")

# settings a checkpoint must be evaluated (and resumed) with: its architecture and input processing
ARCHITECTURE_KEYS = ("image_encoder", "image_encoder_kwargs", "text_encoder", "embed_dim", "image_res", "max_words")
# ... and what else a resumed run must share with the run that wrote the checkpoint
RESUME_KEYS = (*ARCHITECTURE_KEYS, "ita_type", "data_size")


class CheckpointError(RuntimeError):
    """The chosen checkpoint cannot be loaded on every rank; the message names rank and path.

    Every rank raises the same one; ``rank`` says which rank raised it, so that one prints it."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


def choose_resume(resume: str | None, output_dir: str | Path) -> str | None:
    """The checkpoint to continue from, chosen by rank 0 and the same on every rank (a
    collective call): ``resume`` itself, or for ``"auto"`` the file ``checkpoint_latest.pth``
    of ``output_dir`` stands for (None: start afresh)."""
    choice = None
    if parallel.is_main_process():
        if resume == "auto":
            latest = CheckpointDir(output_dir).latest()
            choice = str(latest) if latest is not None else None
        else:
            choice = resume or None
    return parallel.broadcast_object(choice)


def load_on_every_rank(path: str | Path, purpose: str) -> dict:
    """Load ``path`` on every rank (a collective call) and check that every rank read the same
    step; otherwise raise CheckpointError on every rank. ``purpose`` names the use ("resume")."""
    state, error = None, None
    try:
        state = load_checkpoint(path)
        step = state["progress"]["step"]
        shards = state.get("loss_shards", {}).get("files", [])
        missing = [name for name in shards if not (Path(path).parent / name).is_file()]
        if missing:
            raise FileNotFoundError(f"its loss state shard files {', '.join(missing)} are missing beside it")
    except Exception as err:  # unreadable, truncated, not a checkpoint: all ranks must hear of it
        step, error = None, f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    reports = parallel.gather_objects((step, error))
    chosen_step = reports[0][0]
    problems = [
        f"rank {r} cannot read it ({err})" if err else f"rank {r} reads step {s} from it, rank 0 step {chosen_step}"
        for r, (s, err) in enumerate(reports)
        if err or s != chosen_step
    ]
    if problems:
        raise CheckpointError(
            f"cannot {purpose} from {path}: {'; '.join(problems)}. Every rank must see the same file: put "
            "--output_dir on a file system shared by all nodes (and let it catch up), or copy the checkpoint "
            "to each node's folder",
            parallel.rank(),
        )
    return state


def check_resumable(config: dict, state: dict, path: str | Path) -> list[str]:
    """The settings that differ from the checkpoint's and forbid continuing it (empty: none)."""
    saved = state.get("config", {})
    return [f"{k}: {saved[k]!r} there, {config[k]!r} here" for k in RESUME_KEYS if k in saved and saved[k] != config[k]]


def architecture_of(state: dict) -> dict:
    """The model settings stored in a checkpoint, so any config can evaluate it."""
    saved = state.get("config", {})
    return {key: saved[key] for key in ARCHITECTURE_KEYS if key in saved}
