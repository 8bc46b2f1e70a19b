"""DeepCache (Ma et al., CVPR 2024): reuse the UNet's deep features across sampling steps, under any sampler.

A full call runs the whole UNet and keeps the deep feature that enters the up path at one skip branch: the
output of the previous up block, before its concatenation with that branch's skip (Sec. 3.2). A cached call
runs only the shallow blocks, the down blocks up to the branch and the up blocks from it on, with the kept
feature standing in for everything deeper. Which steps are full (Sec. 3.3), `schedule=`: `uniform`, every N-th
(uniform 1:N); `nonuniform`, steps packed around a centre step by a power law in real arithmetic (our reading
of the paper's non-uniform 1:N); `official`, the official code's non-uniform rule reproduced exactly
(`official_steps`: complex roots, truncation, a search over the power).

Branches are numbered from 0 exactly as the official DDPM code's `--branch` (horseee/DeepCache,
`ddpm/models/deepcache_diffusion.py`: level b // 3, block b % 3, block 2 the downsample; its 3 is our n + 1 for
the DDPM UNets' n = 2, the only n that code handles): the official `--branch 2` is our `branch=2`. The skip
stack is conv_in, then for each level its `num_res_blocks` (n) block outputs and its downsample. Branch b is
level b // (n + 1), position b % (n + 1), where position n is the level's downsample; valid branches are
0 .. L (n + 1) - 2 for L levels. The default, b = n - 1 (1 for the DDPM UNets), caches everything below the
first resolution level: a cached call runs only the full-resolution blocks, and its MACs ratios for the CIFAR-10
UNet are the paper's CIFAR-10 figures. b = n (2), the official README's CIFAR-10 choice, is the level's downsample:
it also reruns a 16x16 up block with attention and saves less (docs/acceleration.md,
benchmarks/results/deepcache_macs.md).
Down block (level, j) pairs with up block (level, n - 1 - j); the downsample of level l with up block (l + 1, n).

The wrapper is a `model(x, t) -> eps` that no sampler needs to know about. It is told the sampling timesteps
(constructor or `plan`) and picks the full steps among them. A call is full when it is the first at a full-step
timestep in the current trajectory; every other call is cached, including the extra (float) timesteps that PNDM's
Runge-Kutta start and FON's midpoints visit. A call at the first timestep starts a new trajectory (so a new batch
never reuses the last one's features), as do `reset()`, no cache yet, and a new input shape. With interval 1 every
call is full. A solver that chooses its own evaluation times (sampler=pf) has no steps to pick among: with
`count="calls"` every interval-th call of a trajectory is full instead (uniform 1:N over calls).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..unet import UNet
from .macs import count_macs

__all__ = [
    "DeepCache",
    "uniform_steps",
    "nonuniform_steps",
    "official_steps",
    "cached_cost",
    "macs_speedup",
]

SCHEDULES = ("uniform", "nonuniform", "official")
COUNTS = ("steps", "calls")


# ---------------------------------------------------------------- which steps are full (Sec. 3.3)


def uniform_steps(steps: int, interval: int) -> list[int]:
    """Indices 0, N, 2N, ... of the full steps among `steps` sampling steps (uniform 1:N)."""
    _check_schedule(steps, interval)
    return list(range(0, steps, interval))


def nonuniform_steps(steps: int, interval: int, center: float = 0.5, power: float = 1.4) -> list[int]:
    """Full-step indices of the non-uniform 1:N schedule, dense around the centre step c = center * steps.

    Our reading of the paper's rule, in real arithmetic: k = ceil(steps / N) values l_i spread evenly over
    [-c^(1/p), (steps - c)^(1/p)) (end excluded), each mapped to c + sign(l) |l|^p and rounded. Indices that
    round to the same step are kept once, so a steep power can leave fewer than k full steps. The first value
    maps to step 0: the first step is always full.
    """
    _check_schedule(steps, interval)
    _check_power_rule(center, power)
    k, c = math.ceil(steps / interval), center * steps
    lo, hi = -(c ** (1 / power)), (steps - c) ** (1 / power)
    ls = [lo + (hi - lo) * i / k for i in range(k)]
    return sorted({min(round(c + math.copysign(abs(v) ** power, v)), steps - 1) for v in ls})


def official_steps(steps: int, interval: int, center: int, pow: float) -> list[int]:
    """Full-step indices of the official DeepCache code's non-uniform 1:N rule (its `sample_from_quad_center`).

    k = ceil(steps / N) full steps around the centre step c = `center` with exponent p = `pow`: k + 1 points
    evenly spaced from (-c)^(1/p), the principal complex root, to (steps - c)^(1/p); each raised to the power p,
    its real part truncated toward zero; of the distinct values the smallest and the largest dropped, c added,
    and step 0 put in front. While that gives other than k steps, p is lowered by 0.02 (as long as p > 1). For
    c = steps / 2 the values are odd about c, so truncation merges the pair closest to c when k is odd and the
    pair lies within 1 of it: no p then works (e.g. N = 2, steps = 6, 10, 14, ...) and we raise where the
    official DDPM code would go on with fewer full steps. N = 1 gives every step, as in the official SD code.
    """
    _check_schedule(steps, interval)
    if isinstance(center, bool) or not isinstance(center, int) or not 0 <= center <= steps:
        raise ValueError(f"center={center!r} must be a step index in 0..{steps} (the official --center)")
    if not pow > 1:
        raise ValueError(f"pow={pow} must be > 1: the official rule lowers it in steps of 0.02 while it stays > 1")
    k = -(-steps // interval)
    if interval == 1:
        return list(range(steps))
    p = pow
    while p > 1:  # the same float sequence as the official loop: p, p - 0.02, (p - 0.02) - 0.02, ...
        ends = (-center) ** (1 / p), (steps - center) ** (1 / p)  # complex for c > 0: (-c)^(1/p) = c^(1/p) e^(i pi/p)
        values = np.real(np.linspace(*ends, k + 1) ** p).astype(np.int32)  # int32 of a complex: real part, truncated
        full = [0] + [int(v) + center for v in np.unique(values)[1:-1]]
        if len(full) == k:
            return full
        p -= 0.02
    raise ValueError(
        f"the official non-uniform rule finds no power in (1, {pow}] that gives exactly {k} full steps among "
        f"{steps} at interval {interval} around step {center}: move the centre, change the interval or the steps, "
        "or use schedule=nonuniform"
    )


def _check_schedule(steps: int, interval: int) -> None:
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"interval={interval!r} must be an int >= 1: one full step, then interval - 1 cached ones")
    if steps < 1:
        raise ValueError(f"DeepCache needs at least one sampling step, got {steps}")


def _check_power_rule(center: float, power: float) -> None:
    if not 0.0 <= center <= 1.0:
        raise ValueError(
            f"center={center} must lie in [0, 1]: the centre step as a fraction of the sampling steps "
            "(the official --center C with S steps is center=C/S)"
        )
    if power < 1.0:
        raise ValueError(f"power={power} must be >= 1 (1: evenly spaced; larger: more full steps near the centre)")


# ---------------------------------------------------------------- the wrapper


class DeepCache(nn.Module):
    """`model(x, t) -> eps` that runs a full UNet pass only at the full steps and the shallow branch otherwise.

    Args:
        model: the UNet to wrap (its `embed`, `down_level`, `mid`, `up_level` and `head` are used).
        timesteps: the sampler's descending timesteps; or pass them later to `plan`.
        interval: N of the paper's 1:N; 1 is exactly the plain model.
        branch: the skip branch to cache at (see the module docstring); None: below the first resolution level.
        schedule: which steps are full: "uniform" (every N-th), "nonuniform" (`nonuniform_steps`) or "official"
            (`official_steps`, at the centre step round(center * steps) and pow = `power`).
        center, power: the centre as a fraction of the steps, and the exponent, of the two non-uniform rules.
        count: "steps", full steps among the timesteps; "calls", every interval-th call since the trajectory's
            first (for adaptive solvers such as sampler=pf, whose calls are not known in advance; uniform only).
            None is "steps" (sample.py's null picks by the sampler).
        uniform: replaced by `schedule`; refused with the translation, so an old config fails loudly.
    """

    def __init__(
        self,
        model: UNet,
        timesteps: Tensor | Sequence[int] | None = None,
        *,
        interval: int = 3,
        branch: int | None = None,
        schedule: str = "uniform",
        center: float = 0.5,
        power: float = 1.4,
        count: str | None = "steps",
        uniform: bool | None = None,
    ) -> None:
        super().__init__()
        if not all(hasattr(model, a) for a in ("embed", "conv_in", "down_level", "mid", "up_level", "head")):
            raise ValueError(f"DeepCache wraps a diffusion.unet.UNet (it runs the UNet's levels), got {type(model)}")
        if uniform is not None:
            raise ValueError(
                f"uniform={uniform} is replaced by schedule: use schedule=uniform for uniform=true, "
                "schedule=nonuniform for uniform=false (or schedule=official, the official code's non-uniform rule)"
            )
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not a schedule of full steps: choose one of {SCHEDULES}")
        count = "steps" if count is None else count
        if count not in COUNTS:
            raise ValueError(f"count={count!r}: choose steps (full steps among the timesteps) or calls (every N-th)")
        if count == "calls" and schedule != "uniform":
            raise ValueError(
                f"schedule={schedule} places full steps by the number of steps, which a solver that picks its own "
                "calls (count=calls) does not know in advance: use schedule=uniform"
            )
        _check_schedule(1, interval)
        _check_power_rule(center, power)
        if schedule == "official" and not power > 1:
            raise ValueError(f"power={power} must be > 1 for schedule=official (its search lowers it while > 1)")
        self.model, self.interval, self.schedule, self.center, self.power = model, interval, schedule, center, power
        self.count = count
        self.branch, self._down, self._up = _locate(model, branch)
        self.full_calls = self.shallow_calls = 0
        self.timesteps: list[int] | None = None
        self.full_steps: list[int] = []  # indices into timesteps
        self._full_t: set[int] = set()  # the timesteps at those indices
        self.reset()
        if timesteps is not None:
            self.plan(timesteps)

    def plan(self, timesteps: Tensor | Sequence[int]) -> DeepCache:
        """Take the sampler's descending timesteps, choose the full steps among them and empty the cache."""
        ts = [int(t) for t in torch.as_tensor(timesteps).flatten()]
        if not ts or any(a <= b for a, b in zip(ts, ts[1:], strict=False)):
            raise ValueError(f"timesteps must be a non-empty, strictly descending sequence, got {ts[:8]}...")
        self.timesteps, self.full_steps = ts, self.pick(len(ts))
        self._full_t = {ts[i] for i in self.full_steps}
        self.reset()
        return self

    def pick(self, steps: int) -> list[int]:
        """Indices of the full steps among `steps` sampling steps, by this wrapper's schedule."""
        if self.schedule == "uniform":
            return uniform_steps(steps, self.interval)
        if self.schedule == "nonuniform":
            return nonuniform_steps(steps, self.interval, self.center, self.power)
        return official_steps(steps, self.interval, round(self.center * steps), self.power)

    def reset(self) -> None:
        """Forget the cached feature: the next call is full. The call counters keep counting."""
        self._deep: Tensor | None = None
        self._shape: torch.Size | None = None
        self._refreshed: set[int] = set()
        self._calls = 0  # since the trajectory's first, for count="calls"

    def forward(self, x: Tensor, t: Tensor | int, y: Tensor | None = None) -> Tensor:
        """eps of the UNet (with class labels y, if it takes them); a batch of another shape than the cached one
        (a guidance interval switching the unconditional half on or off) is a full step."""
        step = self._step(t, x)
        if self.timesteps is not None and step == self.timesteps[0]:
            self._refreshed.clear()  # the first timestep: a new trajectory
            self._calls = 0
        full = self._is_full(step, x)
        self._calls += 1
        if full:
            eps, deep = self._full(x, t, y)
            self._deep, self._shape = deep.detach(), x.shape
            self._refreshed.add(step)
            self.full_calls += 1
            return eps
        self.shallow_calls += 1
        return self._shallow(x, t, self._deep, y)

    def _is_full(self, step: int, x: Tensor) -> bool:
        if self.interval == 1 or self._deep is None or x.shape != self._shape:
            return True
        if self.count == "calls":
            return self._calls % self.interval == 0
        return step in self._full_t and step not in self._refreshed

    def _step(self, t: Tensor | int, x: Tensor) -> int | float:
        """The call's timestep: an int, or a float between the integers (the ODE solvers' evaluations), which
        is never a planned step."""
        t = torch.as_tensor(t).flatten()
        if t.numel() == 0 or (t != t[0]).any():
            raise ValueError("DeepCache needs one timestep per call (every row of t equal), as samplers pass it")
        value = t[0].item()
        step = int(value) if float(value).is_integer() else value
        if self.timesteps is None and self.interval > 1:
            raise ValueError("DeepCache needs the sampling timesteps: DeepCache(model, timesteps) or .plan(timesteps)")
        if self.timesteps is not None and step > self.timesteps[0]:
            raise ValueError(
                f"t={step} lies above the first planned timestep {self.timesteps[0]}: "
                "plan(timesteps) with the same timesteps the sampler walks"
            )
        return step

    # ------------------------------------------------------------ the two passes, made of the UNet's own pieces

    def _full(self, x: Tensor, t: Tensor | int, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """eps, and the deep feature entering up block (u, s): the same operations as UNet.forward."""
        m, (u, s) = self.model, self._up
        temb = m.embed(t, x) if y is None else m.embed(t, x, y)
        h = m.conv_in(x)
        skips = [h]
        for i in range(m.num_levels):
            h = m.down_level(i, h, temb, skips)
        h = m.mid(h, temb)
        for i in reversed(range(m.num_levels)):
            if i == u:
                deep = h = m.up_level(i, h, temb, skips, stop=s)
                h = m.up_level(i, h, temb, skips, start=s)
            else:
                h = m.up_level(i, h, temb, skips)
        return m.head(h), deep

    def _shallow(self, x: Tensor, t: Tensor | int, deep: Tensor, y: Tensor | None = None) -> Tensor:
        """eps from the down blocks up to the branch, the cached deep feature, and the up blocks from the branch."""
        m, (level, pos), (u, s) = self.model, self._down, self._up
        temb = m.embed(t, x) if y is None else m.embed(t, x, y)
        h = m.conv_in(x)
        skips = [h]
        for i in range(level):
            h = m.down_level(i, h, temb, skips)
        m.down_level(level, h, temb, skips, stop=None if pos == m.num_res_blocks else pos + 1)
        h = m.up_level(u, deep, temb, skips, start=s)
        for i in reversed(range(u)):
            h = m.up_level(i, h, temb, skips)
        return m.head(h)

    def extra_repr(self) -> str:
        shape = "" if self.schedule == "uniform" else f", center={self.center}, power={self.power}"
        calls = ", every interval-th call" if self.count == "calls" else ""
        return (f"interval={self.interval}, branch={self.branch} (level, position {self._down}), "
                f"{self.schedule}{shape}{calls}")  # fmt: skip


def _locate(model: UNet, branch: int | None) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """branch -> (branch, (down level, position), (up level, block)); position n is the level's downsample."""
    n, levels = model.num_res_blocks, model.num_levels
    last = levels * (n + 1) - 2  # the last level has no downsample
    if branch is None:
        if levels < 2:
            raise ValueError(f"this UNet has one level, no branch after it: choose branch in 0..{last}")
        branch = n - 1
    if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch <= last:
        raise ValueError(
            f"branch={branch!r} does not exist in this UNet ({levels} levels of {n} blocks): choose 0..{last} "
            f"(0 is the shallowest and fastest; {n - 1}, the default, keeps the first resolution level)"
        )
    level, pos = divmod(branch, n + 1)
    return branch, (level, pos), ((level + 1, n) if pos == n else (level, n - 1 - pos))


# ---------------------------------------------------------------- cost: MACs of a cached call vs a full one


def cached_cost(model: UNet, branch: int | None = None) -> float:
    """MACs of a cached call over those of a full call at `branch`: the paper's MACs ratio is 1 / this at N = inf."""
    cache = DeepCache(model, interval=1, branch=branch)
    p = next(model.parameters())
    x = torch.zeros(1, model.in_channels, model.resolution, model.resolution, device=p.device, dtype=p.dtype)
    t = torch.zeros(1, dtype=torch.int64, device=p.device)
    deep = {}
    full = count_macs(model, lambda: deep.setdefault("h", cache._full(x, t)[1]))
    return count_macs(model, lambda: cache._shallow(x, t, deep["h"])) / full


def macs_speedup(share: float, full: int, total: int) -> float:
    """Theoretical speed-up of `total` calls of which `full` are full and the rest cost `share` of one."""
    return total / (full + (total - full) * share)
