"""Our models out to diffusers' folder format (UNet2DModel + DDPMScheduler configs, safetensors weights), with the
names mapping of diffusion.io.pretrained, which reads such folders back.

    python -m diffusion.io.export outputs/.../last.ckpt DIR    # a checkpoint's EMA weights -> a diffusers folder
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import UsageError, reported
from ..schedule import Schedule, cosine, linear, quadratic, sigmoid
from ..unet import Attention, UNet
from ..wrappers.prediction import Prediction, inner
from .pretrained import DIFFUSERS_VERSION, FIXED, PREDICTION_TYPES, WEIGHTS, to_diffusers

__all__ = ["diffusers_config", "scheduler_config", "export", "export_checkpoint", "main"]


def diffusers_config(model: UNet) -> dict:
    """The UNet2DModel config that rebuilds `model` exactly."""
    attn = ["Attn" if isinstance(level.attn[0], Attention) else "" for level in model.down]
    down = [f"{a}DownBlock2D" for a in attn]
    fixed = {key: accepted[0] for key, (_, accepted, _) in FIXED.items()}
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION, **fixed,
        "sample_size": model.resolution, "in_channels": model.in_channels,
        "out_channels": model.conv_out.out_channels,
        "block_out_channels": [level.res[0].conv2.out_channels for level in model.down],
        "down_block_types": down, "up_block_types": [b.replace("Down", "Up") for b in reversed(down)],
        "layers_per_block": model.num_res_blocks, "dropout": model.down[0].res[0].dropout.p,
        "attention_head_dim": None, "norm_num_groups": model.norm_out.num_groups, "attn_norm_num_groups": None,
        "time_embedding_dim": None,
    }  # fmt: skip


def scheduler_config(schedule: Schedule, prediction: str = "eps") -> dict:
    """A DDPMScheduler config with `schedule`'s betas and the network's prediction_type: by name where one of
    diffusers' formulas gives them (to 1e-12), else listed as trained_betas (a zero-terminal-SNR schedule too, its
    last beta 1, so that diffusers reads the very betas rather than its own clamped rescaling)."""
    T, betas = schedule.T, schedule.betas.cpu()
    first, last = betas[0].item(), betas[-1].item()
    candidates = [
        ("linear", first, last, linear(T, first, last)),
        ("scaled_linear", first, last, quadratic(T, first, last)),
        ("squaredcos_cap_v2", 1e-4, 0.02, cosine(T)),  # beta_start and beta_end are unused
        ("sigmoid", 1e-4, 0.02, sigmoid(T)),
    ]
    theirs = {ours: name for name, ours in PREDICTION_TYPES.items()}[prediction]
    base = {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION, "num_train_timesteps": T,
            "prediction_type": theirs, "variance_type": "fixed_small", "clip_sample": True}  # fmt: skip
    for kind, start, end, named in candidates:
        if torch.allclose(named.betas, betas, rtol=1e-12, atol=0):
            return {**base, "beta_schedule": kind, "beta_start": start, "beta_end": end, "trained_betas": None}
    return {**base, "beta_schedule": "linear", "beta_start": first, "beta_end": last, "trained_betas": betas.tolist()}


def export(model: UNet | Prediction, schedule: Schedule, folder: str | Path) -> Path:
    """Write `model` and `schedule` as a diffusers folder: config.json, the safetensors weights and
    scheduler_config.json with what the network predicts (UNet2DModel.from_pretrained and
    DDPMScheduler.from_pretrained read it)."""
    predicts = model.prediction if isinstance(model, Prediction) else "eps"
    model = inner(model)
    if not isinstance(model, UNet):
        raise UsageError(f"only diffusion.unet.UNet exports to UNet2DModel, got {type(model).__name__}")
    if model.num_classes is not None:
        raise UsageError(f"this UNet is class-conditional ({model.num_classes} classes and a no-label row), which "
                         "the export does not map to UNet2DModel's num_class_embeds yet: sample it with "
                         "sample.py")  # fmt: skip
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in to_diffusers(model.state_dict(), model.num_levels).items()}
    save_file(state, folder / WEIGHTS, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(diffusers_config(model), indent=2, sort_keys=True) + "\n")
    (folder / "scheduler_config.json").write_text(json.dumps(scheduler_config(schedule, predicts), indent=2) + "\n")
    return folder


def export_checkpoint(ckpt_path: str | Path, folder: str | Path, use_ema: bool = True) -> Path:
    """Export one of our training checkpoints (its EMA weights, or the raw ones) as a diffusers folder."""
    from . import checkpoints  # Lightning: only needed here; it builds through diffusion.io.registry

    if not Path(ckpt_path).is_file():
        raise UsageError(f"no checkpoint at {ckpt_path}: give a .ckpt written by train.py (outputs/.../last.ckpt)")
    model, schedule = checkpoints.load_model(checkpoints.load(ckpt_path), use_ema=use_ema)
    return export(model, schedule, folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffusion.io.export", description=__doc__.split("\n")[0])
    parser.add_argument("ckpt", help="a .ckpt written by train.py")
    parser.add_argument("folder", help="the folder to write (created if needed)")
    parser.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA weights")
    args = parser.parse_args(argv)
    with reported(ValueError, OSError):  # also a folder it cannot write
        folder = export_checkpoint(args.ckpt, args.folder, use_ema=not args.raw)
    print(f"wrote {'raw' if args.raw else 'EMA'} weights of {args.ckpt} to {folder} (diffusers UNet2DModel format)")


if __name__ == "__main__":
    main()
