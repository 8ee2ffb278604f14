"""A run's results directory: what makes it someone else's, checked without importing PyTorch or Flower
(`fedsafe simulate` checks it before Ray starts)."""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_NAME = "checkpoint.pt"


def reused_out_dir(out: Path, resume: bool, how_to_resume: str) -> str | None:
    """Why `out` must not take a new run (it holds an earlier run's checkpoint, which a new run would
    overwrite, losing the way to resume it), or None. `how_to_resume`: the way the caller resumes
    (`resume=true` in a run config, `--resume` on the command line)."""
    path = Path(out).expanduser() / CHECKPOINT_NAME
    if resume or not path.exists():
        return None
    return (f"{path} holds the checkpoint of an earlier run; continue that run with {how_to_resume}, "
            "or give this run another out-dir")
