"""Skip-Tuning (Ma et al., ICML 2024): scale the UNet's skip features before the up path concatenates them.

Few-step ODE samplers ask the UNet for something close to a one-shot push-forward from noise to data; the paper
finds that the skip connections hand the decoder too much of the noisy input for that, and that shrinking them
(rho < 1), with no training, improves few-step FID the most (best rho about 0.65-0.85 on the EDM models).

Notation: level i = 0 .. L-1 of the UNet, 0 the shallowest (full resolution), L-1 the deepest. Every skip that
up[i] consumes is multiplied by

    rho_i = (1 - i / (L - 1)) * rho_top + i / (L - 1) * rho_bottom,

linear from rho_top at the top (the outermost skips) to rho_bottom at the bottom (the innermost). The skips up[i]
consumes are conv_in's output (i = 0), the outputs of down[i]'s blocks, and the downsample feeding level i (the
downsample of level i - 1, already at level i's resolution), so one rho belongs to one resolution. Only the skips are
scaled: the path from the middle block up is left alone.

Where we may depart from the paper: the stored copies of the paper reachable here gave its abstract, not its method
section, so the interpolation follows the seed notes (linear over resolution levels, one rho per level) rather than
the paper's text. If the paper interpolates per skip connection instead, the two agree at both ends and differ only
by a fraction of a level step in between.

The scaling itself lives once, in UNet.up_level's `rho`; this wrapper presents the UNet's pieces (embed, conv_in,
down_level, mid, up_level, head, ...) with its rho_i filled in, and its forward is UNet.forward on those pieces. So
DeepCache(SkipTuning(unet), ...) scales the skips in both its full and its shallow (cached) calls, and rho = 1
everywhere is the plain UNet bit for bit.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ..unet import UNet

__all__ = ["SkipTuning", "skip_scales"]


def skip_scales(num_levels: int, rho_top: float, rho_bottom: float) -> list[float]:
    """rho_i for levels i = 0 (top) .. L-1 (bottom): linear from rho_top to rho_bottom, the ends exact."""
    rho_top, rho_bottom = _check_rho("rho_top", rho_top), _check_rho("rho_bottom", rho_bottom)
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 1:
        raise ValueError(f"num_levels={num_levels!r} must be an int >= 1")
    if rho_top == rho_bottom:  # one value, exactly (rho = 1 must multiply nothing)
        return [rho_top] * num_levels
    if num_levels == 1:
        raise ValueError(
            f"this UNet has one level, both top and bottom: give it one rho (rho_top = rho_bottom), "
            f"got rho_top={rho_top} and rho_bottom={rho_bottom}"
        )
    w = [i / (num_levels - 1) for i in range(num_levels)]
    return [(1 - wi) * rho_top + wi * rho_bottom for wi in w]


def _check_rho(name: str, rho: float) -> float:
    if isinstance(rho, bool) or not isinstance(rho, int | float):
        raise ValueError(
            f"{name}={rho!r} must be a number (the paper's best: about 0.65-0.85; 1 leaves the skip as is)"
        )
    if not math.isfinite(rho) or rho <= 0:
        raise ValueError(
            f"{name}={rho} must be finite and > 0: it multiplies the skip features (1 leaves them as trained; "
            "the paper's best values are about 0.65-0.85)"
        )
    return float(rho)


class SkipTuning(nn.Module):
    """`model(x, t) -> eps` of a diffusion.unet.UNet whose skip features are scaled by rho_i at level i.

    Args:
        model: the UNet (a checkpoint's or a `pretrained=` folder's; both load our UNet class).
        rho_top: the scale of the outermost skips (level 0, full resolution).
        rho_bottom: the scale of the innermost skips (the deepest level).
    """

    def __init__(self, model: UNet, rho_top: float = 1.0, rho_bottom: float = 0.8) -> None:
        super().__init__()
        if isinstance(model, SkipTuning):
            raise ValueError("this model is Skip-Tuned already: set rho_top and rho_bottom on one SkipTuning")
        if not isinstance(model, UNet):
            raise ValueError(
                f"Skip-Tuning scales the skips of diffusion.unet.UNet (it runs the UNet's levels), got "
                f"{type(model).__name__}; wrap the bare UNet, and put DeepCache outside: "
                "DeepCache(SkipTuning(unet), timesteps)"
            )
        self.model = model
        self.rho = skip_scales(model.num_levels, rho_top, rho_bottom)
        self.rho_top, self.rho_bottom = self.rho[0], self.rho[-1]

    def forward(self, x: Tensor, t: Tensor | int, y: Tensor | None = None) -> Tensor:
        """eps [B, C', H, W]: UNet.forward itself, run on this wrapper's pieces (whose up_level scales the skips)."""
        return UNet.forward(self, x, t, y)  # type: ignore[arg-type]

    # ------------------------------------------------------------ the UNet's interface, skips scaled

    def up_level(
        self, i: int, h: Tensor, temb: Tensor, skips: list[Tensor], start: int = 0, stop: int | None = None
    ) -> Tensor:
        """UNet.up_level with level i's rho_i."""
        return self.model.up_level(i, h, temb, skips, start, stop, rho=self.rho[i])

    def embed(self, t: Tensor | int, x: Tensor, y: Tensor | None = None) -> Tensor:
        return self.model.embed(t, x, y)

    def down_level(self, i: int, h: Tensor, temb: Tensor, skips: list[Tensor], stop: int | None = None) -> Tensor:
        return self.model.down_level(i, h, temb, skips, stop)

    def head(self, h: Tensor) -> Tensor:
        return self.model.head(h)

    @property
    def conv_in(self) -> nn.Conv2d:
        return self.model.conv_in

    @property
    def mid(self) -> nn.Module:
        return self.model.mid

    @property
    def down(self) -> nn.ModuleList:
        return self.model.down

    @property
    def up(self) -> nn.ModuleList:
        return self.model.up

    @property
    def ch(self) -> int:
        return self.model.ch

    @property
    def num_levels(self) -> int:
        return self.model.num_levels

    @property
    def num_res_blocks(self) -> int:
        return self.model.num_res_blocks

    @property
    def in_channels(self) -> int:
        return self.model.in_channels

    @property
    def resolution(self) -> int:
        return self.model.resolution

    def extra_repr(self) -> str:
        levels = ", ".join(f"{r:.4g}" for r in self.rho)
        return f"rho_top={self.rho_top}, rho_bottom={self.rho_bottom} (levels top to bottom: {levels})"
