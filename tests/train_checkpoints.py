"""Reading which checkpoint Ray Train has recorded while the run is still training (tests that stop or kill
a run once it has a checkpoint to resume from poll for one)."""

from __future__ import annotations

from bpo_ray.train.fit import latest_checkpoint


def recorded_checkpoint(train_dir) -> tuple[str, int] | None:
    """The checkpoint Ray Train has recorded so far for the run in ``train_dir``, if any.

    Ray Train's controller rewrites its snapshot in place (truncate, then write), so a reader polling during
    a run sometimes finds it empty or cut short: 907 of 836k reads during one 30-step run of test_train.py's
    trajectory. It also deletes checkpoints beyond ``keep_checkpoints`` right after recording a new one, so
    the folder a snapshot read a moment ago named may be gone. Either is "nothing readable yet": the caller
    polls again. After a run ``latest_checkpoint`` reads the snapshot strictly."""
    try:
        return latest_checkpoint(str(train_dir))
    except (ValueError, FileNotFoundError):  # the first: the snapshot half-written
        return None
