"""Run folders: one per run, never shared, never holding two runs' samples.

Hydra names a run's folder by the second it starts, so two runs started in the same second would share one (and
its last.ckpt). conf/*.yaml append `${run_token:}`, a short token of this run, after the time: folders still sort
by start time. Importing this module registers the resolver: entry points import it before @hydra.main.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from ..errors import UsageError

__all__ = ["run_token", "claim_out_dir", "SAMPLE_OUTPUTS"]

SAMPLE_OUTPUTS = ("samples.npz", "grid.png", "fid.json", "images/*.png")


@functools.cache
def run_token() -> str:
    """6 hex digits naming this run; the same for every call in this process (a sweep's jobs share its folder).

    Random, except under torchrun: its ranks of one job derive the same token from what their launcher gives them
    all (run id, master address and port, the launcher's pid), so they compose the same folder name."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        shared = [os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")]
        return hashlib.blake2s(" ".join([*shared, str(os.getppid())]).encode(), digest_size=3).hexdigest()
    return secrets.token_hex(3)


OmegaConf.register_new_resolver("run_token", run_token, replace=True)


def claim_out_dir(folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """`folder`, created, checked to be writable and to hold no samples of another run; with `overwrite`, the stale
    ones are removed first. Called before any long work, so an unusable folder never costs a run's samples.

    Left in place, another run's images/000123.png beside this run's samples.npz would pass for this run's."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"out_dir={folder} is a file, not a folder: pass out_dir=PATH of a folder (new or empty)")
    _check_writable(folder)
    stale = sorted(p for pattern in SAMPLE_OUTPUTS for p in folder.glob(pattern) if p.is_file())
    if stale and not overwrite:
        names = ", ".join(str(p.relative_to(folder)) for p in stale[:3]) + (", ..." if len(stale) > 3 else "")
        raise UsageError(
            f"{folder} already holds samples of another run ({names}): pass a new out_dir=PATH, "
            "or overwrite=true to remove those samples first"
        )
    for path in stale:
        path.unlink()
    return folder


def _check_writable(folder: Path) -> None:
    """UsageError unless a file can be created in `folder` (tried for real: permission bits lie to root, and /proc
    refuses anyway). Folders made for the try are removed again, so a run refused later leaves nothing behind."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # creating a file is what writing the samples will need
            pass
    except OSError as error:
        raise UsageError(f"cannot write into out_dir={folder} ({error.strerror or error}): pass out_dir=PATH of a "
                         "folder this user can write") from None  # fmt: skip
    finally:
        for path in missing:  # deepest first
            try:
                path.rmdir()
            except OSError:
                break
