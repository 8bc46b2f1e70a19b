"""Generating many images with any sampler: per-image seeds, batches, NFE counting, several processes.

Image i of a run depends only on (seed, i), as in EDM's generate.py: its starting noise x_T and the fresh noise
of stochastic samplers come from generators seeded by (seed, i). So the images do not change with the batch
size or the number of GPUs, and a run of 50k images can be split across processes and gathered in order.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import UsageError
from ..images import to_uint8

__all__ = ["image_seed", "image_noise", "RowGenerators", "CountCalls", "Autocast", "generate", "distributed",
           "check_room"]  # fmt: skip

T = TypeVar("T")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def image_seed(seed: int, i: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed for image i of a run (stream 0: x_T; stream 1: the sampler's fresh noise)."""
    return int(np.random.SeedSequence((seed, i, stream)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def image_noise(seed: int, indices: Sequence[int], shape: tuple[int, ...]) -> Tensor:
    """x_T [len(indices), *shape]: row k drawn from its own generator seeded by (seed, indices[k])."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(seed, i))) for i in indices]
    return torch.stack(rows)


class RowGenerators:
    """One CPU generator per image, passed to a sampler as its `generator`: `randn(shape)` draws row k of the
    noise from image k's own stream, so stochastic samplers (DDPM, DDIM with eta > 0) stay per-image
    reproducible. Samplers draw through `diffusion.sampling.core.randn_like`, which accepts either kind."""

    def __init__(self, seed: int, indices: Sequence[int]) -> None:
        self.generators = [torch.Generator().manual_seed(image_seed(seed, i, stream=1)) for i in indices]

    def randn(self, shape: Sequence[int], *, device: torch.device | str, dtype: torch.dtype) -> Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for {shape[0]} rows requested from {len(self.generators)} per-image generators")
        rows = [torch.randn(tuple(shape[1:]), generator=g) for g in self.generators]
        return torch.stack(rows).to(device=device, dtype=dtype)


class CountCalls(nn.Module):
    """Wraps a model, counts its evaluations (a sampler's NFE) and ticks an optional progress bar per call."""

    def __init__(self, model: Callable[[Tensor, Tensor], Tensor], bar: tqdm | None = None) -> None:
        super().__init__()
        self.model, self.calls, self.bar = model, 0, bar

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self._tick()
        return self.model(x, t)

    @property
    def predict(self) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """The model's own (eps, x0) where it has one (core.denoise asks for it), counted as one call."""
        inner = self.model.predict  # AttributeError where the model has none: then there is none here either

        def predict(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            self._tick()
            return inner(x, t)

        return predict

    def _tick(self) -> None:
        self.calls += 1
        if self.bar is not None:
            self.bar.update(1)


class Autocast(nn.Module):
    """Runs the model under autocast (bf16 / fp16 on GPUs) and hands the sampler float32 eps: the sampler's
    arithmetic stays in float32 whatever the network computes in."""

    def __init__(self, model: Callable[[Tensor, Tensor], Tensor], dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: Tensor, t: Tensor, *y: Tensor) -> Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x, t, *y).float()  # y: a conditional network's labels


def generate(
    model: Callable[[Tensor, Tensor], Tensor],
    sampler: Callable[..., Tensor],
    schedule,
    timesteps: Tensor,
    shape: tuple[int, int, int],
    indices: Sequence[int],
    *,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    prepare: Callable[[], None] | None = None,
    progress: bool = True,
    condition: Callable[[Sequence[int]], None] | None = None,
) -> Iterator[tuple[np.ndarray, int, int]]:
    """Yield (uint8 [b, H, W, C] images, model calls, non-finite images) for `indices` in batches, image i seeded
    by (seed, i).

    A diverged model draws NaN, which uint8 would turn into black images: the count of images with any NaN or
    infinite value, taken before the conversion, lets the caller refuse them. `prepare` runs before every batch
    (e.g. to empty DeepCache's cache, so no batch reuses another's features); `condition(batch)` too, with the
    batch's image indices (e.g. to set their labels on diffusion.wrappers.guidance.Guided).
    """
    n_batches = -(-len(indices) // batch_size)
    batches = (indices[k : k + batch_size] for k in range(0, len(indices), batch_size))  # lazily: n may be huge
    outer = tqdm(batches, total=n_batches, desc="batches", unit="batch", disable=not progress or n_batches < 2)
    inner = tqdm(desc="model evaluations", unit="call", leave=False, disable=not progress)
    counted = CountCalls(model, inner)
    for batch in outer:
        if prepare is not None:
            prepare()
        if condition is not None:
            condition(batch)
        inner.reset(total=inner.total)  # known after the first batch (an adaptive solver may take more or fewer)
        before = counted.calls
        noise = image_noise(seed, batch, shape).to(device)
        x0 = sampler(counted, noise, schedule, timesteps, generator=RowGenerators(seed, batch))
        if inner.total is None:
            inner.total = counted.calls - before
        nonfinite = int((~torch.isfinite(x0)).flatten(1).any(1).sum())
        yield to_uint8(x0), counted.calls - before, nonfinite
    inner.close()


def check_room(n: int, shape: tuple[int, int, int], folder: Path) -> None:
    """UsageError, before any sampling, when n uint8 images of `shape` [C, H, W] cannot be held: twice in memory
    (each process's batches, then the gathered array) or once on the disk of `folder` (samples.npz)."""
    size = n * math.prod(shape)
    existing = next(p for p in (Path(folder), *Path(folder).parents) if p.exists())  # the folder may not exist yet
    memory, disk = _available_memory(), shutil.disk_usage(existing).free
    for need, have, where in ((2 * size, memory, "memory"), (size, disk, f"disk space in {folder}")):
        if have is not None and need > have:
            most = max(1, n * have // need)
            raise UsageError(
                f"n_samples={n} needs {_bytes(need)} of {where} for the images ({shape[1]}x{shape[2]}x{shape[0]} "
                f"uint8 each), and {_bytes(have)} are free: draw at most n_samples={most}, or several runs with "
                "other seeds"
            )


def _available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux's MemAvailable), or None where it is not known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


# ---------------------------------------------------------------- several processes


class Distributed:
    """Rank and world size under `torchrun` (WORLD_SIZE, RANK, LOCAL_RANK), or a single process.

    Rank r takes images r, r + W, r + 2W, ...; `gather` puts the shards back in index order on rank 0 through
    files in the output folder (no image count is too large for the interconnect), named with rank 0's `token`
    so that another run writing into the same folder cannot take them for its own.
    """

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            torch.distributed.init_process_group(backend)
        self.token = self.broadcast(secrets.token_hex(4))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        """`auto`: this rank's GPU if there is one, else the CPU; `cuda` means this rank's GPU."""
        if requested == "auto":
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        if requested == "cuda" and self.world > 1:
            requested = f"cuda:{self.local_rank}"
        return torch.device(requested)

    def shard(self, n: int) -> range:
        return range(self.rank, n, self.world)

    def broadcast(self, value):
        """rank 0's value on every rank (e.g. the output folder, whose name holds the time)."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on rank 0 alone, its result on every rank. Its UsageError is raised on every rank, so that no
        rank waits for one that stopped (e.g. rank 0 refusing an output folder)."""
        result, problem, raised = None, None, None
        if self.is_main:
            try:
                result = fn(*args)
            except UsageError as error:
                problem, raised = str(error), error
        result, problem = self.broadcast((result, problem))
        if raised is not None:
            raise raised  # the main process keeps the error's own type (e.g. a registry refusal)
        if problem is not None:
            raise UsageError(problem)
        return result

    def total(self, value: int) -> int:
        """The sum of every rank's `value`, on every rank (e.g. the non-finite images, so all ranks stop alike)."""
        if self.world == 1:
            return value
        values = [0] * self.world
        torch.distributed.all_gather_object(values, value)
        return sum(values)

    def part(self, folder: Path, rank: int) -> Path:
        """Where rank `rank` leaves its images for `gather`: unique to this run, hidden."""
        return folder / f".part-{self.token}-{rank}.npy"

    def gather(self, images: np.ndarray, n: int, folder: Path) -> np.ndarray | None:
        """All ranks' images in index order on rank 0 (None elsewhere)."""
        if self.world == 1:
            return images
        folder.mkdir(parents=True, exist_ok=True)
        part = self.part(folder, self.rank)
        try:
            np.save(part, images)
            torch.distributed.barrier()
            result = None
            if self.is_main:
                parts = [np.load(self.part(folder, r)) for r in range(self.world)]
                result = np.empty((n, *images.shape[1:]), dtype=np.uint8)
                for r, shard in enumerate(parts):
                    result[r :: self.world] = shard
            torch.distributed.barrier()
        finally:
            part.unlink(missing_ok=True)
        return result

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@contextlib.contextmanager
def distributed() -> Iterator[Distributed]:
    dist = Distributed()
    try:
        yield dist
    finally:
        dist.close()
