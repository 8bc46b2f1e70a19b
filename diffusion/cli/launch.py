"""What entry points do before building a Trainer: keep DDP workers in this run.

Lightning starts DDP workers by re-running the command line with `hydra.run.dir` set to the parent's run
directory. Under a Hydra multirun that command line is the whole sweep, so each worker would start a sweep of
its own in new directories. `job_environment` points the workers at this job alone.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch

__all__ = ["job_environment"]


@contextlib.contextmanager
def job_environment() -> Iterator[None]:
    """Run one Hydra job so that DDP workers re-run exactly this job, in this job's directory.

    Lightning's launcher leaves MASTER_PORT, LOCAL_RANK, WORLD_SIZE, ... in this process's environment and its
    process group open; the next job of a sweep would take itself for a worker and never start its own. Both
    are undone when the job ends. Call inside @hydra.main.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or "LOCAL_RANK" in os.environ:  # not Hydra, or already a worker
        yield
        return
    hydra_cfg, saved_env, saved_argv = HydraConfig.get(), dict(os.environ), list(sys.argv)
    os.environ["DIFFUSION_RUN_DIR"] = hydra_cfg.runtime.output_dir  # read by conf/train.yaml's hydra.run.dir
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
