"""Class labels and guidance as a model wrapper: classifier-free guidance (Ho & Salimans 2022) with CFG rescale
(Lin et al. 2024) and a guidance interval (Kynkaenniemi et al. 2024), and autoguidance (Karras et al. 2024).

`Guided(net, num_classes, scale=w)` turns a conditional network `net(x, t, y)` into the `model(x, t)` every sampler
and wrapper above it takes; the labels of the images being drawn are set per batch (`condition(y)`), so no sampler
learns that labels or guidance exist. With scale w (Ho & Salimans's w: 0 is the plain conditional model; diffusers'
and Imagen's guidance_scale is 1 + w) the output is

    out = out_c + w (out_c - out_u),    out_c = net(x, t, y),  out_u = net(x, t, no label)   (Ho & Salimans eq. 6)

with both halves in one batched forward of 2B images. `out` is the network's raw output (eps, x0 or v): the
combination has weights 1 + w and -w, which sum to 1, and every target's eps and x0 are affine in the output at a
fixed x_t and t, so guiding the raw output is guiding eps and x0 alike (diffusion.wrappers.prediction sits outside).

- rescale phi (Lin et al. 2024, Sec. 3.4): out <- phi * out * std(out_c) / std(out) + (1 - phi) * out, per image,
  on the raw output as the paper's (v) and diffusers' (eps or v) code do.
- interval (sigma_lo, sigma_hi] (Kynkaenniemi et al. 2024), in EDM's sigma = sqrt((1 - alpha_bar) / alpha_bar):
  guide only there; elsewhere the conditional model alone, at the cost of one B-image forward.
- guide (autoguidance, Karras et al. 2024): a weaker model of the same kind (smaller, or trained for less), called
  with the same labels (none for an unconditional pair): out = out_main + w (out_main - out_guide). It needs no
  "no label" entry, so it serves unconditional models too; the two networks are two forwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..schedule import Schedule

__all__ = ["Guided", "sigma_of", "conditional_net", "num_classes_of", "find"]


def sigma_of(schedule: Schedule, t: Tensor) -> Tensor:
    """EDM's noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) at t [B] (inf where alpha_bar = 0), float64."""
    abar = schedule.alpha_bar(t)
    return ((1 - abar) / abar).sqrt()


def _wrapped(net: nn.Module) -> nn.Module | None:
    """The module a wrapper wraps: `.net` (Prediction, Guided, ConsistencyModel) or `.model` (DeepCache, Skip-Tuning,
    Autocast); None for the network itself."""
    inner = getattr(net, "net", None)
    inner = inner if isinstance(inner, nn.Module) else getattr(net, "model", None)
    return inner if isinstance(inner, nn.Module) else None


def num_classes_of(net: nn.Module) -> int | None:
    """The label count of a (wrapped) class-conditional UNet; None for an unconditional one."""
    while not hasattr(net, "num_classes") and _wrapped(net) is not None:
        net = _wrapped(net)
    return getattr(net, "num_classes", None)


def find(net: nn.Module) -> Guided | None:
    """The Guided wrapper inside a stack of wrappers (where sample.py sets each batch's labels), or None."""
    while net is not None and not isinstance(net, Guided):
        net = _wrapped(net)
    return net


def conditional_net(net: nn.Module, y: Tensor):
    """`net(x, t, y)` with the labels bound, as a `model(x, t)` (the training previews' conditional sampling)."""
    return Guided(net, num_classes_of(net) or 0, labels=y)


class Guided(nn.Module):
    """`net(x, t, y)` with per-batch labels (`condition`), guided, as `model(x, t)` (see the module docstring).

    Args:
        net: the conditional network (a UNet with num_classes, maybe inside DeepCache / Skip-Tuning / Autocast), or
            with `guide` any network of the guide's kind.
        num_classes: the network's label count; label `num_classes` is "no label" (0 with a `guide` and no labels).
        scale: w; 0 with no guide is the conditional model alone (one forward).
        rescale: phi in [0, 1]; 0: none.
        interval: (sigma_lo, sigma_hi), or None: guide at every step.
        guide: autoguidance's weaker network (then `scale` weighs it instead of the unconditional half).
        schedule: the noise schedule, which an interval needs to read sigma from t.
    """

    def __init__(self, net: nn.Module, num_classes: int, *, scale: float = 0.0, rescale: float = 0.0,
                 interval: Sequence[float] | None = None, guide: nn.Module | None = None,
                 schedule: Schedule | None = None, labels: Tensor | None = None) -> None:  # fmt: skip
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 <= scale < float("inf"):
            raise ValueError(f"guidance={scale!r} must be a number >= 0 (Ho & Salimans's w; 0: no guidance)")
        if isinstance(rescale, bool) or not isinstance(rescale, int | float) or not 0 <= rescale <= 1:
            raise ValueError(f"guidance_rescale={rescale!r} must lie in [0, 1] (Lin et al. 2024 use 0.7; 0: off)")
        if interval is not None:
            interval = tuple(float(v) for v in interval)
            if len(interval) != 2 or not 0 <= interval[0] < interval[1]:
                raise ValueError(f"guidance_interval={list(interval)} must be [sigma_lo, sigma_hi] with 0 <= lo < hi "
                                 "(EDM's sigma; Kynkaenniemi et al. use e.g. [0.28, 5.42])")  # fmt: skip
            if schedule is None:
                raise ValueError("a guidance interval needs the schedule, to read sigma from t")
        self.net, self.num_classes, self.guide, self.schedule = net, num_classes, guide, schedule
        self.scale, self.rescale, self.interval = float(scale), float(rescale), interval
        self.labels = labels
        self.in_channels = getattr(net, "in_channels", None)
        self.resolution = getattr(net, "resolution", None)

    def condition(self, labels: Tensor | None) -> None:
        """The labels [B] of the images the next calls draw (None: no label, e.g. an unconditional pair)."""
        self.labels = labels

    def _call(self, net: nn.Module, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return net(x, t) if y is None else net(x, t, y)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        y = None if self.labels is None else self.labels.to(x.device)
        if y is not None and len(y) != len(x):
            raise ValueError(f"{len(y)} labels set for a batch of {len(x)} images: condition(y) with one per image")
        t = torch.as_tensor(t, device=x.device).expand(len(x)) if torch.as_tensor(t).ndim == 0 else t
        if self.scale == 0:
            return self._call(self.net, x, t, y)
        inside = self._inside(t)
        if inside is not None and not bool(inside.any()):
            return self._call(self.net, x, t, y)  # outside the interval: the conditional model alone
        if self.guide is not None:
            main, weak = self._call(self.net, x, t, y), self._call(self.guide, x, t, y)
        elif y is None:
            raise ValueError("classifier-free guidance needs the images' labels: condition(y) before sampling")
        else:
            null = torch.full_like(y, self.num_classes)
            main, weak = self._call(self.net, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        out = main + self.scale * (main - weak)
        if self.rescale > 0:
            dims = tuple(range(1, x.ndim))
            ratio = main.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True)
            out = self.rescale * (out * ratio) + (1 - self.rescale) * out
        if inside is not None and not bool(inside.all()):
            out = torch.where(inside.view(-1, *[1] * (x.ndim - 1)), out, main)
        return out

    def _inside(self, t: Tensor) -> Tensor | None:
        """Which rows lie in the guidance interval (None: no interval, every row is guided)."""
        if self.interval is None:
            return None
        sigma = sigma_of(self.schedule, t)
        return (sigma > self.interval[0]) & (sigma <= self.interval[1])

    def extra_repr(self) -> str:
        kind = "autoguidance" if self.guide is not None else "classifier-free"
        parts = [f"{kind}, w={self.scale:g}"] + [f"rescale={self.rescale:g}"] * (self.rescale > 0)
        return ", ".join(parts + ([f"interval={list(self.interval)}"] if self.interval else []))
