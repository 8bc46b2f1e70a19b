"""Published DDPM weights in diffusers' folder format, in and out of our UNet (no diffusers import at runtime).

A folder holds `config.json` (a diffusers UNet2DModel config), `diffusion_pytorch_model.safetensors` and
`scheduler_config.json`, either side by side or in `unet/` and `scheduler/` (a pipeline folder, as the
google/ddpm-* repositories are today). Names, ours -> diffusers (level i of L; the up path is numbered in reverse):

    temb.0 / temb.2          time_embedding.linear_1 / linear_2
    down.i.res.j             down_blocks.i.resnets.j        (temb_proj -> time_emb_proj, skip -> conv_shortcut)
    down.i.attn.j            down_blocks.i.attentions.j     (norm -> group_norm, proj -> to_out.0,
                                                             qkv = [to_q; to_k; to_v] stacked on the output dim)
    down.i.resample          down_blocks.i.downsamplers.0
    mid.res1 / attn / res2   mid_block.resnets.0 / attentions.0 / resnets.1
    up.i.*                   up_blocks.(L-1-i).*            (resample -> upsamplers.0)
    norm_out                 conv_norm_out

The other way, our checkpoints to diffusers folders, is diffusion.io.export.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from ..errors import UsageError
from ..plain import check_file_data
from ..schedule import Schedule, cosine, linear, quadratic, rescale_zero_terminal_snr, sigmoid
from ..unet import NORM_EPS, UNet
from ..weights import check_state
from ..wrappers.prediction import Prediction

__all__ = ["load", "unet_from_config", "schedule_from_config", "prediction_from_config", "to_diffusers",
           "PREDICTION_TYPES"]  # fmt: skip

WEIGHTS = "diffusion_pytorch_model.safetensors"
MAX_JSON_BYTES = 1 << 20  # config.json and scheduler_config.json are a few KB (trained_betas: ~20 KB)
DIFFUSERS_VERSION = "0.30.0"  # recorded in the configs we write, as diffusers does; checked with diffusers 0.42
HOW_TO_GET = (
    "download one with `hf download google/ddpm-cifar10-32 --local-dir DIR` (`huggingface-cli download` with "
    "older huggingface_hub) or `git clone https://huggingface.co/google/ddpm-cifar10-32 DIR`"
)

# UNet2DModel options our UNet fixes: name -> (diffusers' default when absent, the values we accept, why)
FIXED = {
    "center_input_sample": (False, (False,), "inputs are taken as given, in [-1, 1]"),
    "time_embedding_type": ("positional", ("positional",), "the sinusoidal timestep embedding"),
    "freq_shift": (0, (1,), "DDPM's frequencies exp(-log(1e4) k / (half - 1))"),
    "flip_sin_to_cos": (True, (False,), "DDPM's [sin | cos] order"),
    "mid_block_type": ("UNetMidBlock2D", ("UNetMidBlock2D",), "ResBlock, attention, ResBlock"),
    "mid_block_scale_factor": (1, (1,), "unscaled residuals"),
    "downsample_padding": (1, (0,), "TF 'SAME' padding of the stride-2 conv, right and bottom only"),
    "downsample_type": ("conv", ("conv",), "a stride-2 conv"),
    "upsample_type": ("conv", ("conv",), "nearest-neighbour x2 and a conv"),
    "act_fn": ("silu", ("silu", "swish"), "SiLU"),
    "norm_eps": (1e-5, (NORM_EPS,), "the GroupNorm eps NORM_EPS of diffusion/unet.py"),
    "resnet_time_scale_shift": ("default", ("default",), "the timestep embedding added, not a scale and shift"),
    "add_attention": (True, (True,), "the middle block always has attention"),
    "class_embed_type": (None, (None,), "an unconditional model"),
    "num_class_embeds": (None, (None,), "an unconditional model"),
}
SHAPE_KEYS = ("sample_size", "block_out_channels", "down_block_types", "up_block_types")
OTHER_KEYS = (
    "in_channels", "out_channels", "layers_per_block", "dropout", "attention_head_dim", "norm_num_groups",
    "attn_norm_num_groups", "time_embedding_dim", "num_train_timesteps",  # the last: only for learned embeddings
)  # fmt: skip
# The types of the keys we read (None: absent, diffusers' default), checked before anything is built from them.
TYPES = {
    "in_channels": (int, "a whole number"), "out_channels": (int, "a whole number"),
    "layers_per_block": (int, "a whole number"), "norm_num_groups": (int, "a whole number"),
    "attn_norm_num_groups": (int, "a whole number"), "attention_head_dim": (int, "a whole number"),
    "time_embedding_dim": (int, "a whole number"), "num_train_timesteps": (int, "a whole number"),
    "dropout": ((int, float), "a number"), "sample_size": ((int, list), "a whole number (or [H, W])"),
    "block_out_channels": (list, "a list of whole numbers"), "down_block_types": (list, "a list of block names"),
    "up_block_types": (list, "a list of block names"),
}  # fmt: skip
ITEM_TYPES = {"sample_size": int, "block_out_channels": int, "down_block_types": str, "up_block_types": str}
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}  # diffusers' prediction_type -> ours
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "GaussianDDPMScheduler")  # the last: legacy name
# diffusers' beta_schedule -> ours; each is the same formula (tests/test_pretrained.py checks them against diffusers)
BETA_SCHEDULES = {"linear": linear, "scaled_linear": quadratic, "squaredcos_cap_v2": cosine, "sigmoid": sigmoid}


# ---------------------------------------------------------------- weight names

_RENAMES = [  # ours -> diffusers, applied in order, after up.i has become up_blocks.(L-1-i)
    (r"^temb\.0\.", "time_embedding.linear_1."), (r"^temb\.2\.", "time_embedding.linear_2."),
    (r"^norm_out\.", "conv_norm_out."), (r"^mid\.attn\.", "mid_block.attentions.0."),
    (r"^mid\.res([12])\.", lambda m: f"mid_block.resnets.{int(m[1]) - 1}."),
    (r"^down\.(\d+)\.resample\.", r"down_blocks.\1.downsamplers.0."), (r"^down\.", "down_blocks."),
    (r"^(up_blocks\.\d+)\.resample\.", r"\1.upsamplers.0."),
    (r"\.res\.", ".resnets."), (r"\.attn\.", ".attentions."), (r"\.temb_proj\.", ".time_emb_proj."),
    (r"\.skip\.", ".conv_shortcut."), (r"\.norm\.", ".group_norm."), (r"\.proj\.", ".to_out.0."),
]  # fmt: skip
_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # diffusers < 0.14 attention


def _names(name: str, num_levels: int) -> list[str]:
    """The diffusers name(s) of one of our parameters: three (to_q, to_k, to_v) for a fused qkv."""
    name = re.sub(r"^up\.(\d+)\.", lambda m: f"up_blocks.{num_levels - 1 - int(m[1])}.", name)
    for ours, theirs in _RENAMES:
        name = re.sub(ours, theirs, name)
    return [name.replace(".qkv.", f".to_{p}.") for p in "qkv"] if ".qkv." in name else [name]


def to_diffusers(state: dict[str, Tensor], num_levels: int) -> dict[str, Tensor]:
    """Our UNet state dict under diffusers' UNet2DModel names (qkv split into to_q, to_k, to_v)."""
    out = {}
    for name, value in state.items():
        names = _names(name, num_levels)
        out.update(zip(names, value.chunk(len(names)), strict=True))
    return out


def _from_diffusers(theirs: dict[str, Tensor], model: UNet, source: Path) -> dict[str, Tensor]:
    """`model`'s state dict from diffusers-named tensors (either attention naming); every tensor must find a place."""
    legacy = re.compile(r"(attentions\.\d+)\.(query|key|value|proj_attn)\.")
    theirs = {legacy.sub(lambda m: f"{m[1]}.{_LEGACY[m[2]]}.", k): v for k, v in theirs.items()}
    state, used = {}, set()
    for name in model.state_dict():
        names = _names(name, model.num_levels)
        missing = [n for n in names if n not in theirs]
        if missing:
            raise UsageError(f"{source} lacks {missing[0]}: the weights do not match the architecture in config.json")
        state[name] = torch.cat([theirs[n] for n in names]) if len(names) > 1 else theirs[names[0]]
        used.update(names)
    extra = sorted(set(theirs) - used)
    if extra:
        raise UsageError(f"{source} has {len(extra)} weights our UNet has no place for (e.g. {extra[0]})")
    return state


# ---------------------------------------------------------------- import


def load(folder: str | Path) -> tuple[UNet | Prediction, Schedule]:
    """Our UNet (eval mode, float32, CPU) with a diffusers folder's weights, and the schedule it was trained with; a
    network that predicts x0 or v (prediction_type sample, v_prediction) comes wrapped as an eps-model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"no diffusers model folder at {folder}: {HOW_TO_GET}")
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    config = unet_dir / "config.json"
    if not config.is_file():
        raise UsageError(
            f"{folder} has no config.json (nor unet/config.json): not a diffusers model folder; {HOW_TO_GET}"
        )
    scheduler = next((p for p in (folder / "scheduler", folder) if (p / "scheduler_config.json").is_file()), None)
    if scheduler is None:
        raise UsageError(f"{folder} has no scheduler_config.json (nor scheduler/scheduler_config.json), so the "
                         f"noise schedule the weights were trained under is unknown; {HOW_TO_GET}")  # fmt: skip
    with torch.device("meta"):  # no memory yet: a config asking for widths of 200,000 must not allocate 640 GB
        model = unet_from_config(_read_json(config), where=config)
    state = _from_diffusers(_read_weights(unet_dir), model, unet_dir)
    expected = model.state_dict()
    check_state(expected, state, f"the weights in {unet_dir}", str(config))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, assign=True)
    schedule_path = scheduler / "scheduler_config.json"
    scheduler_cfg = _read_json(schedule_path)
    schedule, predicts = schedule_from_config(scheduler_cfg, schedule_path), prediction_from_config(scheduler_cfg)
    model = model.eval()
    return (model if predicts == "eps" else Prediction(model, schedule, predicts)), schedule


def unet_from_config(config: dict, where: str | Path = "config.json") -> UNet:
    """Our UNet (fresh weights) with the architecture of a diffusers UNet2DModel config, or a UsageError naming
    the first option it does not support."""
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise UsageError(f"{where} describes a {config['_class_name']}, not a UNet2DModel (an older diffusers format):"
                         f" download the current revision, whose unet/ folder holds a UNet2DModel")  # fmt: skip
    for key in SHAPE_KEYS:
        if key not in config:
            raise UsageError(f"{where} lacks '{key}': it is not a complete UNet2DModel config")
    for key, (kinds, what) in TYPES.items():
        value = config.get(key)
        ok = isinstance(value, kinds) and not isinstance(value, bool) if value is not None else key not in SHAPE_KEYS
        if ok and isinstance(value, list):
            ok = len(value) > 0 and all(isinstance(v, ITEM_TYPES[key]) and not isinstance(v, bool) for v in value)
        if not ok:
            raise UsageError(f"{where}: {key}={value!r} is not {what}")
    unknown = [k for k, v in config.items() if not k.startswith("_") and k not in (*FIXED, *SHAPE_KEYS, *OTHER_KEYS)]
    if unknown:
        raise UsageError(f"{where}: option {unknown[0]}={config[unknown[0]]!r} is not supported by our UNet")
    for key, (default, accepted, why) in FIXED.items():
        value = config.get(key, default)
        if (value.lower() if key == "act_fn" and isinstance(value, str) else value) not in accepted:
            raise UsageError(f"{where}: {key}={value!r} is not supported; our UNet has {key}={accepted[0]!r} ({why})")

    widths, down, up = list(config["block_out_channels"]), list(config["down_block_types"]), config["up_block_types"]
    _require(widths and all(isinstance(w, int) and w > 0 for w in widths), where, f"block_out_channels={widths}")
    ch, groups, size = widths[0], config.get("norm_num_groups", 32), config["sample_size"]
    size = size[0] if isinstance(size, list | tuple) and len(set(size)) == 1 else size
    _require(isinstance(size, int), where, f"sample_size={config['sample_size']!r}: our UNet takes square images")
    _require(len(widths) == len(down), where, f"{len(widths)} block_out_channels for {len(down)} down blocks")
    _require(set(down) <= {"DownBlock2D", "AttnDownBlock2D"}, where, f"down_block_types={down}")
    mirror = [b.replace("Down", "Up") for b in reversed(down)]
    _require(list(up) == mirror, where, f"up_block_types={list(up)}: ours mirror the down blocks, {mirror}")
    _require(all(w % ch == 0 for w in widths), where, f"block_out_channels={widths}, not multiples of the first")
    _require(ch % 2 == 0, where, f"block_out_channels[0]={ch}: the sinusoidal embedding needs an even width")
    dim = config.get("time_embedding_dim")
    _require(dim in (None, 4 * ch), where, f"time_embedding_dim={dim}: ours is 4 * block_out_channels[0]")
    attn_groups = config.get("attn_norm_num_groups")
    _require(attn_groups in (None, groups), where, f"attn_norm_num_groups={attn_groups} != norm_num_groups")
    blocks = config.get("layers_per_block", 2)
    _require(isinstance(blocks, int), where, f"layers_per_block={blocks!r}: ours is one integer for all levels")
    head_dim = config.get("attention_head_dim", 8)  # diffusers: heads = channels // attention_head_dim
    for width in [w for w, b in zip(widths, down, strict=True) if b == "AttnDownBlock2D"] + [widths[-1]]:
        heads = f"attention_head_dim={head_dim} splits the {width}-channel attention into heads"
        _require(head_dim in (None, width), where, f"{heads}: ours has one (null, or equal to the channels)")
    kwargs = dict(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        ch=ch,
        ch_mult=[w // ch for w in widths],
        num_res_blocks=blocks,
        attn_resolutions=[size >> i for i, b in enumerate(down) if b == "AttnDownBlock2D"],
        dropout=config.get("dropout", 0.0),
        resolution=size,
        norm_groups=groups,
    )
    try:
        return UNet(**kwargs)
    except ValueError as error:
        raise UsageError(f"{where}: {error}") from None


def _require(ok: object, where: str | Path, what: str) -> None:
    if not ok:
        raise UsageError(f"{where}: {what}; not supported by our UNet")


def schedule_from_config(config: dict, where: str | Path = "scheduler_config.json") -> Schedule:
    """The float64 beta schedule of a diffusers DDPM/DDIM/PNDM scheduler config, rescaled to zero terminal SNR where
    it says rescale_betas_zero_snr (the same Lin et al. algorithm as diffusers')."""
    name = config.get("_class_name", "DDPMScheduler")
    if name not in SCHEDULERS:
        raise UsageError(f"{where}: _class_name={name!r} is not supported; use a config of {', '.join(SCHEDULERS[:3])}")
    prediction_from_config(config, where)  # an unknown prediction_type is refused before the weights are read
    zero_snr = config.get("rescale_betas_zero_snr", False)
    if not isinstance(zero_snr, bool):
        raise UsageError(f"{where}: rescale_betas_zero_snr={zero_snr!r} is not true or false")
    T = config.get("num_train_timesteps", config.get("timesteps", 1000))  # `timesteps`: the 2022 key
    try:
        betas = config.get("trained_betas")
        if betas is not None:
            if len(betas) != T:
                raise ValueError(f"trained_betas has {len(betas)} values but num_train_timesteps={T}")
            betas = torch.tensor(betas, dtype=torch.float64)
            return Schedule(rescale_zero_terminal_snr(betas) if zero_snr else betas)
        kind = config.get("beta_schedule", "linear")
        if kind not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule={kind!r} is not supported; choose one of {', '.join(BETA_SCHEDULES)}")
        if kind == "squaredcos_cap_v2":  # diffusers: s = 0.008 and max_beta = 0.999, ours by default
            return cosine(T, zero_terminal_snr=zero_snr)
        start, end = config.get("beta_start", 1e-4), config.get("beta_end", 0.02)
        return BETA_SCHEDULES[kind](T, start, end, zero_terminal_snr=zero_snr)
    except (ValueError, TypeError) as error:
        raise UsageError(f"{where}: {error}") from None


def prediction_from_config(config: dict, where: str | Path = "scheduler_config.json") -> str:
    """What the folder's network predicts, ours named (eps, x0, v), from the scheduler config's prediction_type."""
    theirs = config.get("prediction_type", "epsilon")
    if theirs not in PREDICTION_TYPES:
        raise UsageError(f"{where}: prediction_type={theirs!r} is not supported; ours: "
                         f"{', '.join(PREDICTION_TYPES)}")  # fmt: skip
    return PREDICTION_TYPES[theirs]


def _read_json(path: Path) -> dict:
    """A JSON object from a diffusers folder, as data: plain values, bounded in depth and size, no `${`
    (plain.check_file_data), so nothing read here can become code or a recursion or memory bomb."""
    if path.stat().st_size > MAX_JSON_BYTES:
        raise UsageError(f"{path} is {path.stat().st_size} bytes: a diffusers config is a few KB; not reading it")
    try:
        config = json.loads(path.read_text())
    except RecursionError:
        raise UsageError(f"{path} nests too deep to be a diffusers config") from None
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read {path} as JSON ({error})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path} is not a JSON object")
    check_file_data(config, str(path))
    return config


def _read_weights(folder: Path) -> dict[str, Tensor]:
    """The tensors of `folder`'s weights: the safetensors file, else a .bin only if it is pickle-free."""
    if (folder / WEIGHTS).is_file():
        try:
            return load_file(folder / WEIGHTS)
        except Exception as error:  # a truncated or foreign file: safetensors' own error says which
            raise UsageError(f"cannot read {folder / WEIGHTS} ({type(error).__name__}: {error})") from None
    legacy = folder / "diffusion_pytorch_model.bin"
    if not legacy.is_file():
        raise UsageError(f"{folder} has no {WEIGHTS} (nor a .bin): {HOW_TO_GET}")
    try:
        state = torch.load(legacy, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only met something other than tensors and containers
        raise UsageError(f"{legacy} holds more than plain tensors, so it is not loaded (torch.load with "
                         f"weights_only=True refuses it): convert it to {WEIGHTS} where you trust the file, or "
                         "download the .safetensors file") from None  # fmt: skip
    except Exception as error:  # a truncated or foreign file
        raise UsageError(f"cannot read {legacy} ({type(error).__name__}: {str(error).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UsageError(f"{legacy} is not a state dict of tensors")
    return state
