"""DDNM: zero-shot image restoration by range-null-space decomposition (Wang et al., ICLR 2023).

At each step the clean estimate x0 keeps its null-space part and takes its range-space part from the observation,
x0 <- x0 - A+ (A x0 - y) (Alg. 1), so A x0 = y exactly; then the step to s follows the official code's update,

    x_s = sqrt(abar_s) x0 + sigma_s (eta z + sqrt(1 - eta^2) eps),    sigma_s = sqrt(1 - abar_s), z ~ N(0, I),

which is not DDIM's sigma(eta) (the official `eta` 0.85 mixes fresh noise into the direction term). With measurement
noise (DDNM+, Sec. 3.3 and the official Lambda / Lambda_noise), along each range direction of singular value s
the correction is scaled by lambda and the noise re-balanced so that x_s's noise matches sigma_s:

    tau = sqrt(abar_s) sigma_y / s;   sigma_s >= tau: lambda = 1, noise sqrt(sigma_s^2 - tau^2) z
                                      sigma_s <  tau: lambda = s sigma_s sqrt(1 - eta^2) / (sqrt(abar_s) sigma_y),
                                                      noise sigma_s eta z
and the null space keeps the noiseless update. The operators (diffusion.operators) have one singular value each.
The official code samples 100 leading steps (T_sampling = 100, t = 10 i) at eta = 0.85; its time travel is off by
default and not built here.
"""

from __future__ import annotations

from torch import Tensor

from ..operators import Operator
from ..schedule import Schedule
from .core import Generator, Model, denoise, randn_like, steps, t_batch

__all__ = ["ddnm", "project"]


def project(x0: Tensor, op: Operator, y: Tensor, scale: float | Tensor = 1.0) -> Tensor:
    """x0 - scale * A+ (A x0 - y): the range-space part replaced by y's (scale 1: A x0 = y exactly)."""
    return x0 - scale * op.pinv(op.A(x0) - y)


def ddnm(model: Model, x: Tensor, schedule: Schedule, timesteps: Tensor, *, operator: Operator, y: Tensor,
         eta: float = 0.85, sigma_y: float = 0.0, clip: bool = False,
         generator: Generator = None) -> Tensor:  # fmt: skip
    """DDNM (sigma_y = 0) or DDNM+ (sigma_y > 0) from x_T [B, C, H, W] to x0 with A x0 = y (to rounding, noiseless).

    Args:
        operator, y: the degradation A and the observation y = A x (+ noise of std sigma_y), [B, ...] as A gives it.
        eta: the share of fresh noise in each step's noise (the official 0.85; 0: deterministic).
    """
    if not 0 <= eta <= 1:
        raise ValueError(f"eta={eta} must lie in [0, 1] (DDNM's official value: 0.85)")
    if sigma_y < 0:
        raise ValueError(f"sigma_y={sigma_y} is a standard deviation: use a number >= 0")
    s = float(getattr(operator, "singular", 1.0))
    trajectory, _ = steps(schedule, timesteps)
    for t, _, abar_t, abar_s in trajectory:
        eps, x0 = denoise(model, x, t_batch(x, t), abar_t, clip)
        a, sigma = abar_s**0.5, (1 - abar_s) ** 0.5
        tau = a * sigma_y / s
        if sigma_y == 0 or sigma >= tau:  # DDNM's own step, or DDNM+ where the step's noise covers y's
            x0 = project(x0, operator, y)
            fresh = (sigma**2 - tau**2) ** 0.5 if sigma_y > 0 else sigma * eta
            range_scale = (fresh, 0.0) if sigma_y > 0 else (sigma * eta, sigma * (1 - eta**2) ** 0.5)
        else:
            x0 = project(x0, operator, y, s * sigma * (1 - eta**2) ** 0.5 / (a * sigma_y))
            range_scale = (sigma * eta, 0.0)
        x = a * x0
        if sigma > 0:
            z = randn_like(x, generator)
            null = sigma * eta * z + sigma * (1 - eta**2) ** 0.5 * eps  # the null space: DDNM's noiseless update
            ranged = range_scale[0] * z + range_scale[1] * eps
            on_range = operator.pinv(operator.A(ranged))  # P v: the range part (A+ A is the projection)
            x = x + null - operator.pinv(operator.A(null)) + on_range
    return x
