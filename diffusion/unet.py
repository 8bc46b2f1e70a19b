"""The DDPM noise-prediction network eps_theta(x_t, t) (Ho et al. 2020, Sec. 4 and Appendix B).

A PixelCNN++-style UNet of Wide-ResNet blocks with the timestep added inside every block and single-head
self-attention at chosen resolutions. Layout, with L = len(ch_mult) levels and the resolution halving per level:

    conv_in -> down[0] .. down[L-1] -> mid -> up[L-1] .. up[0] -> head

`down[i]` and `up[i]` work at `resolution / 2**i`; each holds `res` (ResBlocks), `attn` (Attention or Identity
after each block) and `resample` (Downsample / Upsample, or None). The output of conv_in, of every down block
and of every downsample is a skip, popped in reverse by the up blocks: down[i] block j feeds up[i] block
`num_res_blocks - 1 - j`. `forward` is made only of `embed`, `down_level`, `mid`, `up_level` and `head`, so
DeepCache (Ma et al. 2023) can run the shallow pieces around a cached deep feature without a second copy, and
Skip-Tuning (diffusion/wrappers/skiptuning.py) can scale the skips through `up_level`'s `rho` (1 by default: no
multiply).

With `num_classes`, a class embedding is added to the time embedding before its SiLU (as ADM and diffusers'
`num_class_embeds` do), with one extra row, index `num_classes`, for "no label": one network is both conditional
and unconditional (classifier-free guidance, Ho & Salimans 2022; diffusion/wrappers/guidance.py).

Numerics follow the released DDPM checkpoints (and diffusers' UNet2DModel with the google/ddpm-* configs):
GroupNorm eps 1e-6, TF "SAME" padding on the stride-2 conv, sinusoid frequencies spaced log(1e4) / (half - 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNet", "timestep_embedding"]

GROUPS = 32  # DDPM's GroupNorm groups (Wu & He 2018); every width must divide by the group count
NORM_EPS = 1e-6  # tf.contrib group_norm's epsilon, which the released weights were trained with


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding [B, dim] of t [B] in the DDPM/tensor2tensor form: [sin | cos], float32."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(1e4) / (half - 1)))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=NORM_EPS)


# ---------------------------------------------------------------- blocks


class ResBlock(nn.Module):
    """Wide-ResNet block; the embedded timestep is added between the two convs (DDPM, Appendix B)."""

    def __init__(self, cin: int, cout: int, temb_ch: int, dropout: float, groups: int = GROUPS) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, cout)
        self.norm2, self.dropout = _norm(cout, groups), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """x [B, cin, H, W], temb = SiLU(embedding) [B, temb_ch] -> [B, cout, H, W]."""
        h = self.conv1(F.silu(self.norm1(x))) + self.temb_proj(temb)[:, :, None, None]
        return self.skip(x) + self.conv2(self.dropout(F.silu(self.norm2(h))))


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, residual (DDPM, Appendix B; PixelSNAIL)."""

    def __init__(self, c: int, groups: int = GROUPS) -> None:
        super().__init__()
        self.norm, self.qkv, self.proj = _norm(c, groups), nn.Linear(c, 3 * c), nn.Linear(c, c)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]; a free view when x is channels-last
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(C): one head of width C
        return x + self.proj(h).transpose(1, 2).reshape(b, c, height, width)


class Downsample(nn.Module):
    """3x3 conv, stride 2, padded right/bottom only: TF's "SAME" on even sizes, as the released weights expect."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of either path: ResBlocks, each followed by attention (or Identity), then a resample."""

    def __init__(self, res: list[ResBlock], attn: bool, resample: nn.Module | None, groups: int = GROUPS) -> None:
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(Attention(b.conv2.out_channels, groups) if attn else nn.Identity() for b in res)
        self.resample = resample

    def block(self, j: int, h: Tensor, temb: Tensor) -> Tensor:
        return self.attn[j](self.res[j](h, temb))


class Middle(nn.Module):
    """ResBlock, Attention, ResBlock at the lowest resolution."""

    def __init__(self, c: int, temb_ch: int, dropout: float, groups: int = GROUPS) -> None:
        super().__init__()
        self.res1, self.attn = ResBlock(c, c, temb_ch, dropout, groups), Attention(c, groups)
        self.res2 = ResBlock(c, c, temb_ch, dropout, groups)

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        return self.res2(self.attn(self.res1(h, temb)), temb)


# ---------------------------------------------------------------- the UNet


class UNet(nn.Module):
    """eps_theta(x_t, t) of DDPM (Ho et al. 2020): x [B, C, H, W], t int64 [B] (or a scalar) -> eps [B, C', H, W].

    Args:
        ch: base width; level i has ch * ch_mult[i] channels and the time embedding 4 * ch.
        attn_resolutions: feature-map sizes (relative to `resolution`) that get self-attention.
        resolution: the training image size; it decides where attention goes.
        norm_groups: GroupNorm groups. Keep >= 2 channels per group: a group of one channel cancels the
            per-channel time shift a ResBlock adds, and the network no longer sees t.
        num_classes: None (unconditional) or the number of class labels y the network is conditioned on; the
            label `num_classes` (or y=None) means "no label".
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        resolution: int = 32,
        norm_groups: int = GROUPS,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        _check_args(
            in_channels, out_channels, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resolution, norm_groups
        )
        self.ch, self.num_levels, self.num_res_blocks = ch, len(ch_mult), num_res_blocks
        self.in_channels, self.resolution = in_channels, resolution  # the input shape samplers draw noise in
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):  # fmt: skip
            raise ValueError(f"num_classes must be None (unconditional) or a positive int, got {num_classes!r}")
        temb_ch = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.num_classes = num_classes
        self.class_embed = nn.Embedding(num_classes + 1, temb_ch) if num_classes else None  # the last row: no label
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        skips, cin = [ch], ch  # channel counts of the skip stack, mirrored while building the up path
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(cin, ch * mult, temb_ch, dropout, norm_groups))
                cin = ch * mult
                skips.append(cin)
            last = i == self.num_levels - 1
            attn = resolution >> i in attn_resolutions
            self.down.append(Level(blocks, attn, None if last else Downsample(cin), norm_groups))
            if not last:
                skips.append(cin)
        self.mid = Middle(cin, temb_ch, dropout, norm_groups)
        up = []
        for i in reversed(range(self.num_levels)):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(cin + skips.pop(), ch * ch_mult[i], temb_ch, dropout, norm_groups))
                cin = ch * ch_mult[i]
            attn = resolution >> i in attn_resolutions
            up.insert(0, Level(blocks, attn, Upsample(cin) if i > 0 else None, norm_groups))
        self.up = nn.ModuleList(up)  # up[i] works at the resolution of down[i]
        self.norm_out, self.conv_out = _norm(cin, norm_groups), nn.Conv2d(cin, out_channels, 3, padding=1)
        self._init_weights()

    def _init_weights(self) -> None:
        """DDPM init: fan-avg uniform weights and zero biases; each residual branch and conv_out start at zero."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # a second pass: modules() yields a block before the layers inside it
            if isinstance(m, Attention):
                for w in m.qkv.weight.data.chunk(3):  # q, k, v are separate C x C layers in the paper
                    nn.init.xavier_uniform_(w)
                nn.init.zeros_(m.proj.weight)
            elif isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2.weight)
        nn.init.zeros_(self.conv_out.weight)

    # ------------------------------------------------------------ pieces of forward, shared with DeepCache

    def embed(self, t: Tensor | int, x: Tensor, y: Tensor | None = None) -> Tensor:
        """SiLU(MLP(sinusoid(t)) + class_embed(y)) [B, 4ch], the form every ResBlock consumes; a scalar t is broadcast
        to x's batch. y int64 [B] in [0, num_classes] (num_classes: no label; None: no label for every image)."""
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        h = self.temb(timestep_embedding(t, self.ch))
        if self.class_embed is not None:
            y = torch.full((len(h),), self.num_classes, device=x.device) if y is None else y
            h = h + self.class_embed(y)
        elif y is not None:
            raise ValueError("this UNet is unconditional (num_classes=None): it takes no labels y")
        return F.silu(h)

    def down_level(self, i: int, h: Tensor, temb: Tensor, skips: list[Tensor], stop: int | None = None) -> Tensor:
        """Run down[i], pushing every output onto `skips`; with `stop`, only its first `stop` blocks, no downsample."""
        level = self.down[i]
        for j in range(len(level.res) if stop is None else stop):
            h = level.block(j, h, temb)
            skips.append(h)
        if level.resample is not None and stop is None:
            h = level.resample(h)
            skips.append(h)
        return h

    def up_level(
        self,
        i: int,
        h: Tensor,
        temb: Tensor,
        skips: list[Tensor],
        start: int = 0,
        stop: int | None = None,
        rho: float = 1.0,
    ) -> Tensor:
        """Run up[i] from block `start` on, each block on [h, rho * skips.pop()] concatenated along channels; with
        `stop`, only the blocks before it, no upsample (h is then the input of block `stop`). rho != 1 is
        Skip-Tuning's scaled skip (Ma et al. 2024; diffusion/wrappers/skiptuning.py); rho = 1 multiplies nothing."""
        level = self.up[i]
        for j in range(start, len(level.res) if stop is None else stop):
            skip = skips.pop()
            h = level.block(j, torch.cat([h, skip if rho == 1.0 else rho * skip], dim=1), temb)
        return h if level.resample is None or stop is not None else level.resample(h)

    def head(self, h: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, x: Tensor, t: Tensor | int, y: Tensor | None = None) -> Tensor:
        temb = self.embed(t, x, y)
        h = self.conv_in(x)
        skips = [h]
        for i in range(self.num_levels):
            h = self.down_level(i, h, temb, skips)
        h = self.mid(h, temb)
        for i in reversed(range(self.num_levels)):
            h = self.up_level(i, h, temb, skips)
        return self.head(h)


def _check_args(
    in_channels, out_channels, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resolution, norm_groups
) -> None:
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels} and {out_channels}")
    if ch < 1 or norm_groups < 1 or ch % norm_groups:
        raise ValueError(f"ch={ch} must be a positive multiple of norm_groups={norm_groups} (GroupNorm's groups)")
    if not ch_mult or min(ch_mult) < 1:
        raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {ch_mult}")
    if num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    factor = 2 ** (len(ch_mult) - 1)
    if resolution < factor or resolution % factor:
        raise ValueError(
            f"resolution={resolution} must be a positive multiple of 2**(len(ch_mult) - 1) = {factor}: "
            f"it is halved at each of the {len(ch_mult) - 1} downsamples"
        )
    occurring = [resolution >> i for i in range(len(ch_mult))]
    missing = sorted(set(attn_resolutions) - set(occurring))
    if missing:
        raise ValueError(
            f"attn_resolutions {missing} never occur: with resolution={resolution} and {len(ch_mult)} levels "
            f"the feature maps are {occurring}"
        )
